"""The qwen_image_edit family: the tiny QwenImageEditPlusPipeline, sizes taken from the input image,
and Qwen-Image LoRAs on the edit model."""

from __future__ import annotations

import io

import numpy as np
import pytest
from diffusers import QwenImageEditPlusPipeline
from PIL import Image

from deployments import load_pipeline
from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.media import image_size
from deployments.qwen_image import FAMILY as QWEN_IMAGE
from deployments.qwen_image import LORA_TARGETS
from deployments.qwen_image_edit import FAMILY
from deployments.schemas import EditRequest, GenerationJob
from tests.adapter_helpers import loaded
from tests.family_helpers import differs, grey_levels
from tests.lora_files import lora_tensors

PROMPT = "make the sky red"
# A visible change: mean absolute difference in grey levels (0-255).
VISIBLE = 3.0


def png(width: int, height: int, pattern: str = "gradient") -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    if pattern == "gradient":
        pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], axis=-1)
    else:
        pixels = np.repeat((((x // 32 + y // 32) % 2) * 255)[..., None], 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


INPUT = png(320, 192)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("qwen_image_edit", "tiny://qwen_image_edit")


@pytest.fixture(scope="module")
def lora(pipe):
    """A diffusers-format attention LoRA, made before any test wraps layers with peft's."""
    return lora_tensors(pipe.transformer, "transformer", 1, targets=LORA_TARGETS)


@pytest.fixture(scope="module")
def base(pipe, lora):
    return render(pipe, job())


@pytest.fixture
def adapters(pipe, lora, base):
    """PipelineAdapters on the shared pipeline; each test's adapters are deleted after it."""
    adapters = PipelineAdapters(pipe, FAMILY)
    yield adapters
    for name in loaded(pipe):
        adapters.delete(name)


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
    # The pipeline resizes the input image itself (to about 1024x1024 for the VAE).
    assert render(pipe, job(image=png(330, 200))).shape == (192, 320, 3)
    assert render(pipe, job(width=192, height=320)).shape == (320, 192, 3)


def test_render_is_deterministic_per_seed_and_across_builds(pipe, base):
    assert np.array_equal(render(pipe, job()), base)
    assert np.array_equal(
        render(load_pipeline("qwen_image_edit", "tiny://qwen_image_edit"), job()), base
    )
    assert differs(render(pipe, job(seed=1)), base) > VISIBLE


def test_input_image_and_prompt_change_the_output(pipe, base):
    assert differs(render(pipe, job(image=png(320, 192, "checkers"))), base) > VISIBLE
    assert differs(render(pipe, job(prompt="turn it into a pencil drawing")), base) > VISIBLE


def test_saved_model_loads_back_identical(pipe, base, tmp_path):
    pipe.save_pretrained(tmp_path / "qwen-image-edit")
    loaded = load_pipeline("qwen_image_edit", str(tmp_path / "qwen-image-edit"))
    assert np.array_equal(render(loaded, job()), base)


def test_lora_changes_the_image_and_zero_off_or_deleted_is_exactly_the_base(adapters, lora, base):
    assert adapters.check(lora, "edit") == len(lora)
    assert adapters.load("edit", lora, "edit") == len(lora) // 2
    adapters.activate([ActiveAdapter("edit", 1.0, 1.0)])
    assert differs(render(adapters.pipe, job()), base) > VISIBLE
    adapters.activate([ActiveAdapter("edit", 0.0, 0.0)])
    assert np.array_equal(render(adapters.pipe, job()), base)
    adapters.activate([])
    assert np.array_equal(render(adapters.pipe, job()), base)
    adapters.delete("edit")
    assert adapters.pipe.get_list_adapters() == {}
    assert np.array_equal(render(adapters.pipe, job()), base)
