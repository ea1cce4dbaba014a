"""The qwen_image_edit family: the tiny QwenImageEditPlusPipeline and sizes taken from the input
image (what every family keeps, its LoRAs included, is in tests/test_family_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import QwenImageEditPlusPipeline

from deployments import load_pipeline
from deployments.media import image_size
from deployments.qwen_image import FAMILY as QWEN_IMAGE
from deployments.qwen_image_edit import FAMILY
from deployments.schemas import EditRequest, GenerationJob
from tests.family_helpers import grey_levels, png

PROMPT = "make the sky red"
INPUT = png(320, 192)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("qwen_image_edit", "tiny://qwen_image_edit")


def job(**fields) -> GenerationJob:
    values = {"prompt": PROMPT, "negative_prompt": "", "cfg": 4.0, "seed": 0, "steps": 2}
    values |= {"width": 320, "height": 192, "image": INPUT}
    return GenerationJob(adapters=[], **{**values, **fields})


def render(pipe, job: GenerationJob) -> np.ndarray:
    """The image in grey levels, from the pipeline call deployments/base.py makes."""
    return grey_levels(FAMILY, pipe, job)


def test_family_spec():
    assert FAMILY.name == "qwen_image_edit" and FAMILY.endpoint == "qwen-image-edit"
    assert (FAMILY.defaults.steps, FAMILY.defaults.cfg) == (50, 4.0)
    assert FAMILY.media_type == "image/png" and FAMILY.request_model is EditRequest
    assert FAMILY.lora_components == ("transformer",)
    # An edit LoRA is a Qwen-Image LoRA.
    assert FAMILY.lora_markers == QWEN_IMAGE.lora_markers


def test_pipeline_kwargs_pass_the_input_image_and_true_cfg():
    kwargs = FAMILY.pipeline_kwargs(job())
    assert kwargs["image"].size == (320, 192) and kwargs["image"].mode == "RGB"
    assert (kwargs["width"], kwargs["height"]) == (320, 192)
    assert kwargs["negative_prompt"] == " " and kwargs["true_cfg_scale"] == 4.0


def test_production_defaults_render_at_the_input_image_size(pipe):
    assert isinstance(pipe, QwenImageEditPlusPipeline)
    # The deployment fills width and height from the input image, rounded down to this step.
    multiple = FAMILY.size_multiple(pipe)
    width, height = (side // multiple * multiple for side in image_size(INPUT))
    assert (width, height) == (320, 192)
    defaults = FAMILY.defaults
    production = job(width=width, height=height, steps=defaults.steps, cfg=defaults.cfg)
    assert render(pipe, production).shape == (192, 320, 3)


def test_the_requested_size_is_rendered_exactly_whatever_the_input_size(pipe):
    # The pipeline resizes the input image itself (to about 1024x1024 for the VAE). A 330x200
    # input rendered at 320x192 is the contract's edit case (tests/family_helpers.py).
    assert render(pipe, job(width=192, height=320)).shape == (320, 192, 3)
