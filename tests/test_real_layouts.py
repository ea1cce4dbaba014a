"""Every trainer layout of tests/trainer_layouts.py against the real-size model it is for.

The files are built on `meta_pipeline(family)` (real module names and shapes, no weights) and
checked the way the service checks an adapter before loading it: diffusers' metadata alpha
folded in (`apply_metadata_alpha`), then `PipelineAdapters.check`.
"""

from __future__ import annotations

import pytest

from deployments.adapters import PipelineAdapters
from deployments.errors import LoraIncompatible
from deployments.family import FAMILY_NAMES, get_family
from deployments.loras.formats import apply_metadata_alpha
from tests.real_models import meta_pipeline
from tests.trainer_layouts import LAYOUTS

MAX_MESSAGE_CHARS = 500  # a refusal is read by a person in an HTTP error body

# family -> (denoiser block list, its length in the published model)
REAL_DEPTHS = {
    "flux": [("transformer_blocks", 19), ("single_transformer_blocks", 38)],
    "sdxl": [("down_blocks", 3), ("up_blocks", 3)],
    "qwen_image": [("transformer_blocks", 60)],
    "qwen_image_edit": [("transformer_blocks", 60)],
    "z_image": [("layers", 30), ("noise_refiner", 2), ("context_refiner", 2)],
    "wan": [("blocks", 40)],
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_meta_pipeline_is_the_real_model_without_weights(family):
    pipe = meta_pipeline(family)
    spec = get_family(family)
    denoiser = getattr(pipe, spec.denoiser_component)
    for attr, depth in REAL_DEPTHS[family]:
        assert len(getattr(denoiser, attr)) == depth
    for attr in spec.lora_components:
        component = getattr(pipe, attr)
        tensors = [*component.parameters(), *component.buffers()]
        assert tensors and all(t.device.type == "meta" for t in tensors), attr


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_layout(layout):
    pipe = meta_pipeline(layout.family)
    tensors, metadata = layout.build(pipe)
    label = f"{layout.family}-{layout.name}.safetensors"
    adapters = PipelineAdapters(pipe, get_family(layout.family))
    if layout.expect == "loads":
        tensors = apply_metadata_alpha(tensors, metadata, label)
        assert adapters.check(tensors, label) > 0
        return
    with pytest.raises(LoraIncompatible) as refused:
        tensors = apply_metadata_alpha(tensors, metadata, label)
        adapters.check(tensors, label)
    message = refused.value.message
    assert layout.reason in message.lower(), message
    assert len(message) <= MAX_MESSAGE_CHARS, message
