"""The qwen_image family: the tiny QwenImagePipeline, its job mapping, and Qwen-Image LoRAs in
each trainer's format (what every family keeps is in tests/test_family_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

from deployments import load_pipeline
from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.qwen_image import FAMILY, LORA_TARGETS, qwen_special_id
from deployments.schemas import GenerationJob, GenerationRequest
from deployments.tiny import QWEN_SPECIALS
from tests.adapter_helpers import loaded
from tests.family_helpers import differs, grey_levels
from tests.lora_files import lora_tensors

PROMPT = "a red fox in the snow"
SMALL = {"width": 128, "height": 128, "steps": 2}
# A visible change: mean absolute difference in grey levels (0-255).
VISIBLE = 3.0
# ComfyUI-style files carry alpha separately and are scaled by alpha/rank (0.75) on loading;
# measured max abs pixel difference to the same LoRA in diffusers form (floats in [0, 1]):
# 5.7e-5. Ignoring alpha makes the LoRA a third stronger: a max difference of 0.83.
FORMAT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("qwen_image", "tiny://qwen_image")


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
    values = {"prompt": PROMPT, "negative_prompt": "", "cfg": 4.0, "seed": 0, **SMALL}
    return GenerationJob(adapters=[], **{**values, **fields})


def render(pipe, job: GenerationJob) -> np.ndarray:
    """The image in grey levels, from the pipeline call deployments/base.py makes."""
    return grey_levels(FAMILY, pipe, job)


def with_adapters(adapters, *active: ActiveAdapter) -> np.ndarray:
    adapters.activate(list(active))
    return render(adapters.pipe, job())


def test_family_spec():
    assert FAMILY.name == "qwen_image" and FAMILY.endpoint == "qwen-image-2512"
    defaults = FAMILY.defaults
    assert (defaults.width, defaults.height, defaults.steps, defaults.cfg) == (1328, 1328, 50, 4.0)
    assert FAMILY.media_type == "image/png" and FAMILY.output == "image"
    assert FAMILY.request_model is GenerationRequest
    assert FAMILY.lora_components == ("transformer",)


def test_tiny_pipeline_is_a_qwen_image_pipeline_sized_for_1328(pipe):
    assert isinstance(pipe, QwenImagePipeline)
    assert FAMILY.size_multiple(pipe) == 16 and 1328 % 16 == 0
    # The text encoder's vision placeholders are the tokenizer's special tokens.
    for token in QWEN_SPECIALS:
        assert pipe.tokenizer.convert_tokens_to_ids(token) == qwen_special_id(token)
    assert pipe.text_encoder.config.image_token_id == qwen_special_id("<|image_pad|>")


def test_cfg_is_true_classifier_free_guidance_even_without_a_negative_prompt():
    kwargs = FAMILY.pipeline_kwargs(job(cfg=4.0))
    assert kwargs["negative_prompt"] == " " and kwargs["true_cfg_scale"] == 4.0
    assert FAMILY.pipeline_kwargs(job(negative_prompt="blurry"))["negative_prompt"] == "blurry"
    unguided = FAMILY.pipeline_kwargs(job(cfg=1.0))
    assert unguided["true_cfg_scale"] == 1.0 and "negative_prompt" not in unguided
    assert not {"generator", "output_type", "callback_on_step_end"} & set(kwargs)


def test_production_defaults_render_1328_square(pipe):
    defaults = FAMILY.defaults
    production = job(
        width=defaults.width, height=defaults.height, steps=defaults.steps, cfg=defaults.cfg
    )
    assert render(pipe, production).shape == (1328, 1328, 3)


def comfyui_style(lora: dict, style: str, alpha: float = 3.0, rank: int = 4) -> dict:
    """The diffusers LoRA `lora` as a non-diffusers trainer writes it. Files with an alpha are
    scaled by alpha/rank, so their lora_down is `lora_A / (alpha/rank)`."""
    scale = alpha / rank
    out = {}
    for key, tensor in lora.items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        is_down = kind.startswith("A")
        if style == "ai-toolkit":  # peft names, no alpha
            out[f"diffusion_model.{key.removeprefix('transformer.')}"] = tensor
            continue
        if style == "comfyui":
            stem = f"diffusion_model.{module}"
        else:  # kohya / musubi: flattened module path
            stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.lora_{'down' if is_down else 'up'}.weight"] = (
            tensor / scale if is_down else tensor
        )
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


@pytest.mark.parametrize("style", ["comfyui", "ai-toolkit", "kohya"])
def test_non_diffusers_lora_matches_its_diffusers_form(adapters, lora, base, style):
    other = comfyui_style(lora, style)
    assert adapters.check(other, style) == len(lora)
    adapters.load("diffusers", lora, "diffusers")
    adapters.load(style, other, style)
    from_diffusers = with_adapters(adapters, ActiveAdapter("diffusers", 1.0, 1.0))
    from_other = with_adapters(adapters, ActiveAdapter(style, 1.0, 1.0))
    assert differs(from_other, base) > VISIBLE
    assert np.abs(from_other - from_diffusers).max() / 255.0 < FORMAT_TOLERANCE


def test_lora_markers_match_qwen_keys_in_every_style_and_not_flux_keys(pipe):
    mlp = lora_tensors(pipe.transformer, "transformer", 2, targets=("img_mlp.net.2", "txt_mod.1"))
    for style in ("comfyui", "ai-toolkit", "kohya"):
        keys = [*mlp, *comfyui_style(mlp, style)]
        assert all(any(marker in key for marker in FAMILY.lora_markers) for key in keys)
    flux_keys = [
        "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight",
        "transformer.transformer_blocks.0.ff_context.net.0.proj.lora_A.weight",
        "diffusion_model.double_blocks.0.img_mlp.0.lora_down.weight",
        "diffusion_model.double_blocks.0.img_mod.lin.lora_down.weight",
        "lora_unet_double_blocks_0_txt_mlp_2.lora_down.weight",
        "lora_unet_double_blocks_0_txt_mod_lin.lora_down.weight",
    ]
    assert not any(marker in key for marker in FAMILY.lora_markers for key in flux_keys)
