"""A job checked against the model a replica serves, before any adapter loads: its size filled
from an input image and a multiple of the model's step, its stack within the replica's LRU,
its block weights known to the model."""

from __future__ import annotations

from deployments.adapters import PipelineAdapters
from deployments.config import ModelConfig
from deployments.errors import InvalidRequest
from deployments.family import Family
from deployments.media import image_size
from deployments.schemas import GenerationJob


def block_field(index: int) -> str:
    return f"loras.{index}.block_weights"


def resolve_sizes(
    job: GenerationJob, family: Family, pipe, model: ModelConfig, adapters: PipelineAdapters
) -> GenerationJob:
    """The job with sizes filled from an input image and checked against the model."""
    multiple = family.size_multiple(pipe)
    if job.width is None or job.height is None:
        if job.image is None:
            raise InvalidRequest("width and height: required for a model without input image")
        image_width, image_height = image_size(job.image)
        job = job.model_copy(
            update={
                "width": job.width or max(multiple, image_width // multiple * multiple),
                "height": job.height or max(multiple, image_height // multiple * multiple),
            }
        )
    for field in ("width", "height"):
        value = getattr(job, field)
        if value % multiple:
            raise InvalidRequest(
                f"{field}: must be a multiple of {multiple} for this model, got {value}"
            )
    if len(job.adapters) > model.max_adapters_per_replica:
        raise InvalidRequest(
            f"loras: {len(job.adapters)} adapters, but this model keeps at most "
            f"{model.max_adapters_per_replica} per replica"
        )
    for index, use in enumerate(job.adapters):
        adapters.block_scales(use.block_weights, block_field(index))
    return job
