"""The Z-Image Turbo family: request mapping, guidance, and LoRAs in each trainer's format (what
every family keeps is in tests/test_family_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
)

from deployments import load_pipeline
from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.loras.synthetic import lora_tensors
from deployments.media import encode_image
from deployments.schemas import GenerationJob
from deployments.z_image import FAMILY
from tests.adapter_helpers import loaded
from tests.family_helpers import fused_qkv_lora, pipeline_output, production_job

PROMPT = "a red fox in the snow"
SMALL = {"width": 128, "height": 128, "num_inference_steps": 2, "guidance_scale": 4.5}
# AI Toolkit / kohya tensors vs hand-converted diffusers tensors differ only in where alpha/rank
# is multiplied in; measured max abs pixel difference (floats in [0, 1]) with alpha/rank 0.75:
# below 1e-6.
FORMAT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("z_image", "tiny://z_image")


@pytest.fixture(scope="module")
def base(pipe):
    return image(pipe)


@pytest.fixture
def adapters(pipe, base):
    """A PipelineAdapters on the shared pipeline; each test's adapters are deleted after it."""
    adapters = PipelineAdapters(pipe, FAMILY)
    yield adapters
    for name in loaded(pipe):
        adapters.delete(name)


def image(pipe, prompt: str = PROMPT, seed: int = 0, **kwargs) -> np.ndarray:
    return pipeline_output(pipe, prompt, seed, **{**SMALL, **kwargs}).images[0]


def with_adapters(adapters, *active: ActiveAdapter) -> np.ndarray:
    adapters.activate(list(active))
    return image(adapters.pipe)


def on(name: str, strength: float = 1.0) -> ActiveAdapter:
    return ActiveAdapter(name, strength, strength)


def job(**fields) -> GenerationJob:
    return production_job(FAMILY, PROMPT, **fields)


def ai_toolkit_lora(pipe, seed: int, rank: int = 4, alpha: float = 3.0):
    """(AI Toolkit tensors, the same LoRA in diffusers keys). AI Toolkit keeps diffusers'
    module names under `diffusion_model.` and scales each module by its alpha / rank."""
    tensors = lora_tensors(pipe.transformer, "transformer", seed, rank, FAMILY.lora_targets)
    ai_toolkit, diffusers = {}, {}
    for key, matrix in tensors.items():
        name = key.removeprefix("transformer.")
        ai_toolkit[f"diffusion_model.{name}"] = matrix
        ai_toolkit[f"diffusion_model.{name.rpartition('.lora_')[0]}.alpha"] = torch.tensor(alpha)
        diffusers[key] = matrix * alpha / rank if ".lora_B." in key else matrix
    return ai_toolkit, diffusers


def kohya_lora(pipe, seed: int, rank: int = 4, alpha: float = 3.0):
    """(kohya / musubi tensors, the same LoRA in diffusers keys) for every attention layer.
    They use Z-Image's original module names: q, k and v fused in one `qkv` matrix, the output
    projection called `out`; each scaled by alpha / rank."""
    layers = [
        (f"transformer.{name}", "lora_unet_" + name.replace(".", "_"))
        for name, _ in pipe.transformer.named_modules()
        if name.endswith(".attention")
    ]
    return fused_qkv_lora(layers, pipe.transformer.config.dim, "out", seed, rank, alpha)


def test_production_defaults_render_a_1024_jpeg(pipe):
    kwargs = FAMILY.pipeline_kwargs(job())
    assert kwargs == {
        "prompt": PROMPT,
        "negative_prompt": "",
        "width": 1024,
        "height": 1024,
        "num_inference_steps": 8,
        "guidance_scale": 4.5,
    }
    with torch.inference_mode():
        output = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0), output_type="pil")
    assert output.images[0].size == (1024, 1024)
    assert encode_image(output.images[0], FAMILY.media_type)[:3] == b"\xff\xd8\xff"


def test_sizes_step_by_32_pixels(pipe):
    assert FAMILY.size_multiple(pipe) == 32
    assert image(pipe, width=160, height=96).shape == (96, 160, 3)


def test_negative_prompt_steers_only_with_guidance(pipe):
    kwargs = FAMILY.pipeline_kwargs(job(negative_prompt="blurry", cfg=4.5))
    assert kwargs["negative_prompt"] == "blurry" and kwargs["guidance_scale"] == 4.5
    # With guidance it changes the image (tests/test_family_contract.py); cfg 0 is Turbo's
    # distilled mode: one pass per step, the negative prompt unused.
    unguided = image(pipe, guidance_scale=0.0)
    assert np.array_equal(image(pipe, guidance_scale=0.0, negative_prompt="blurry"), unguided)


@pytest.mark.parametrize("make", [ai_toolkit_lora, kohya_lora])
def test_trainer_formats_match_their_diffusers_conversion(adapters, pipe, base, make):
    theirs, diffusers = make(pipe, seed=5, rank=4, alpha=3.0)
    unscaled, _ = make(pipe, seed=5, rank=4, alpha=4.0)
    assert adapters.check(theirs, "theirs") == len(diffusers)
    assert adapters.load("theirs", theirs, "theirs") == len(diffusers) // 2
    adapters.load("diffusers", diffusers, "diffusers")
    adapters.load("unscaled", unscaled, "unscaled")
    from_theirs = with_adapters(adapters, on("theirs"))
    assert np.abs(from_theirs - base).mean() > 0.02
    assert np.abs(from_theirs - with_adapters(adapters, on("diffusers"))).max() < FORMAT_TOLERANCE
    # alpha == rank gives scale 1 instead of 0.75: a different image shows alpha was applied.
    assert np.abs(from_theirs - with_adapters(adapters, on("unscaled"))).max() > 0.01


def other_family_module_names() -> list[str]:
    """Module names of the other families' denoisers (tiny configs), in diffusers form."""
    models = [
        FluxTransformer2DModel(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6),
        ),
        QwenImageTransformer2DModel(
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        ),
        WanTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=12,
            text_dim=32,
            freq_dim=32,
            ffn_dim=32,
            num_layers=1,
        ),
        UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        ),
    ]
    return [name for model in models for name, _ in model.named_modules() if name]


def test_lora_markers_name_every_z_image_key_and_no_other_family_module(pipe):
    ai_toolkit, diffusers = ai_toolkit_lora(pipe, seed=1)
    kohya, _ = kohya_lora(pipe, seed=1)
    comfyui = [  # ComfyUI's own Z-Image module names, as its LoRA saver writes them
        "diffusion_model.layers.0.attention.qkv.lora_down.weight",
        "diffusion_model.layers.0.attention.out.lora_up.weight",
        "diffusion_model.layers.0.feed_forward.w1.alpha",
    ]
    for key in [*ai_toolkit, *diffusers, *kohya, *comfyui]:
        assert any(marker in key for marker in FAMILY.lora_markers), key
    others = other_family_module_names()
    kohya_style = ["lora_unet_" + name.replace(".", "_") for name in others]
    for name in others + kohya_style:
        assert not any(marker in name for marker in FAMILY.lora_markers), name
