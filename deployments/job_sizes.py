"""A job checked against the model a replica serves, before any adapter loads: its size filled
from an input image and a multiple of the model's step, its stack within the replica's LRU,
its block weights known to the model.

An edit's output takes its input image's size the way fal's and Replicate's edit endpoints do:
scaled (keeping the aspect ratio) into the sizes a request may ask for, MIN_SIDE_PX to
MAX_SIDE_PX a side, and rounded down to the model's step. The ingress refused inputs longer
than that box can hold (deployments/media.py)."""

from __future__ import annotations

from deployments.adapters import PipelineAdapters
from deployments.config import ModelConfig
from deployments.errors import InvalidRequest
from deployments.family import Family
from deployments.media import image_size
from deployments.schemas import MAX_SIDE_PX, MIN_SIDE_PX, GenerationJob


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
        width, height = output_size(image_size(job.image), job.width, job.height, multiple)
        job = job.model_copy(update={"width": width, "height": height})
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


def output_size(
    image: tuple[int, int], width: int | None, height: int | None, multiple: int
) -> tuple[int, int]:
    """An edit's (width, height): the request's where given, the rest from the input `image`
    at its aspect ratio. With neither given, the image's size scaled into MIN_SIDE_PX to
    MAX_SIDE_PX a side (only as far as needed); every side derived here is rounded down to
    `multiple` and kept within the box."""
    image_width, image_height = image
    if width is None and height is None:
        scale = min(1.0, MAX_SIDE_PX / max(image))
        scale = max(scale, MIN_SIDE_PX / min(image))
        return _on_step(image_width * scale, multiple), _on_step(image_height * scale, multiple)
    if height is None:
        return width, _on_step(width * image_height / image_width, multiple)
    if width is None:
        return _on_step(height * image_width / image_height, multiple), height
    return width, height


def _on_step(side: float, multiple: int) -> int:
    lowest = -(-MIN_SIDE_PX // multiple) * multiple
    highest = MAX_SIDE_PX // multiple * multiple
    # The epsilon: a scaled side such as 64 / 3 * 3 lands a hair under the whole number it is.
    return min(highest, max(lowest, int(side + 1e-6) // multiple * multiple))
