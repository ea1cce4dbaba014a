"""The sdxl family: the tiny StableDiffusionXLPipeline, its request mapping, and its LoRAs in
diffusers and kohya formats, UNet and both text encoders (what every family keeps is in
tests/test_family_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from deployments import load_pipeline
from deployments.adapters import PipelineAdapters
from deployments.family import get_family
from deployments.schemas import GenerationJob
from deployments.sdxl import FAMILY
from tests.adapter_helpers import CLIP_TARGETS, PROMPT, image, loaded, on, with_adapters
from tests.family_helpers import production_job
from tests.lora_files import lora_tensors
from tests.lora_formats import sgm_block

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# kohya vs diffusers tensors differ only in where alpha/rank (0.75) is multiplied in; measured
# max abs pixel difference (floats in [0, 1]): 2.2e-6.
FORMAT_TOLERANCE = 1e-4
# Mean abs pixel difference (floats in [0, 1]) that counts as a visible change: 1.3 grey levels.
# Measured at adapter_helpers.SMALL (128 px, 2 steps): rank-4 UNet attention LoRA 0.045, LoRA
# on both text encoders 0.028.
VISIBLE = 0.005


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("sdxl", "tiny://sdxl")


@pytest.fixture(scope="module")
def files(pipe):
    """LoRA tensors made from the bare models, before any test wraps their layers with peft's."""
    return {
        "unet": lora_tensors(pipe.unet, "unet", 1, targets=UNET_TARGETS),
        **{
            attr: lora_tensors(getattr(pipe, attr), attr, 3 + i, targets=CLIP_TARGETS)
            for i, attr in enumerate(TEXT_ENCODERS)
        },
    }


@pytest.fixture(scope="module")
def base(pipe, files):
    return image(pipe)


@pytest.fixture(scope="module")
def base_text(pipe, files):
    return text_outputs(pipe)


@pytest.fixture
def adapters(pipe, files, base, base_text):
    """A PipelineAdapters on the shared pipeline; each test's adapters are deleted after it."""
    adapters = PipelineAdapters(pipe, FAMILY)
    yield adapters
    for name in loaded(pipe):
        adapters.delete(name)


def text_outputs(pipe) -> list[torch.Tensor]:
    """Each text encoder's last hidden state, and text_encoder_2's pooled projection."""
    outputs = []
    with torch.inference_mode():
        for attr, tokenizer in zip(TEXT_ENCODERS, (pipe.tokenizer, pipe.tokenizer_2), strict=True):
            ids = tokenizer(PROMPT, padding="max_length", truncation=True, return_tensors="pt")
            out = getattr(pipe, attr)(ids.input_ids)
            outputs.append(out.last_hidden_state.clone())
            if attr == "text_encoder_2":
                outputs.append(out.text_embeds.clone())
    return outputs


def job(**fields) -> GenerationJob:
    return production_job(FAMILY, PROMPT, **fields)


def kohya_sdxl(pipe, files, alpha: float):
    """(kohya sd-scripts tensors, the same LoRA in diffusers keys) for the UNet attention and both
    text encoders. kohya keeps lora_up unscaled and stores alpha; diffusers keys carry
    lora_B * alpha / rank."""
    layers_per_block = pipe.unet.config.layers_per_block
    kohya, diffusers = {}, {}
    for attr, stem in (
        ("unet", "lora_unet_"),
        ("text_encoder", "lora_te1_"),
        ("text_encoder_2", "lora_te2_"),
    ):
        for key, down in files[attr].items():
            if ".lora_A." not in key:
                continue
            up_key = key.replace(".lora_A.", ".lora_B.")
            up = files[attr][up_key]
            path = key.removeprefix(f"{attr}.").removesuffix(".lora_A.weight")
            if attr == "unet":
                path = sgm_block(path, layers_per_block)
            elif not path.startswith("text_model."):
                path = f"text_model.{path}"  # transformers 5 flattened CLIPTextModel; kohya did not
            name = stem + path.replace(".", "_")
            kohya[f"{name}.lora_down.weight"] = down
            kohya[f"{name}.lora_up.weight"] = up
            kohya[f"{name}.alpha"] = torch.tensor(alpha)
            diffusers[key] = down
            diffusers[up_key] = up * alpha / down.shape[0]
    return kohya, diffusers


def test_tiny_sdxl_has_the_sdxl_components(pipe):
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert isinstance(pipe.vae, AutoencoderKL)
    assert type(pipe.text_encoder) is CLIPTextModel
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)


def test_production_defaults_render_a_1024_square(pipe):
    kwargs = FAMILY.pipeline_kwargs(job())
    with torch.inference_mode():
        result = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0), output_type="pil")
    assert result.images[0].size == (1024, 1024)


def test_pipeline_kwargs_map_the_job():
    assert FAMILY.pipeline_kwargs(job()) == {
        "prompt": PROMPT,
        "width": 1024,
        "height": 1024,
        "num_inference_steps": 28,
        "guidance_scale": 7.5,
    }
    with_negative = FAMILY.pipeline_kwargs(job(negative_prompt="blurry", cfg=5.0))
    assert with_negative["negative_prompt"] == "blurry"
    assert with_negative["guidance_scale"] == 5.0


def test_sizes_step_by_32_pixels(pipe):
    multiple = FAMILY.size_multiple(pipe)
    assert multiple == pipe.vae_scale_factor == 32
    assert image(pipe, width=3 * multiple, height=5 * multiple).shape == (160, 96, 3)


def test_kohya_sdxl_file_matches_its_diffusers_form(adapters, pipe, files, base):
    kohya, diffusers = kohya_sdxl(pipe, files, alpha=3.0)
    unscaled, _ = kohya_sdxl(pipe, files, alpha=4.0)
    assert any("input_blocks" in key for key in kohya)
    assert any("output_blocks" in key for key in kohya)
    assert any("middle_block" in key for key in kohya)
    layers = len(diffusers) // 2
    assert adapters.load("kohya", kohya, "kohya") == layers
    assert adapters.load("diffusers", diffusers, "diffusers") == layers
    assert adapters.load("unscaled", unscaled, "unscaled") == layers
    from_kohya = with_adapters(adapters, on("kohya"))
    assert np.abs(from_kohya - base).mean() > 2 * VISIBLE
    assert np.abs(from_kohya - with_adapters(adapters, on("diffusers"))).max() < FORMAT_TOLERANCE
    # alpha == rank scales by 1 instead of 0.75: a different image shows alpha/rank was applied.
    assert np.abs(from_kohya - with_adapters(adapters, on("unscaled"))).mean() > VISIBLE


def test_check_counts_kohya_and_text_model_prefixed_files(adapters, pipe, files):
    kohya, diffusers = kohya_sdxl(pipe, files, alpha=3.0)
    assert adapters.check(kohya, "kohya") == len(diffusers)
    # Diffusers-format SDXL files name text_encoder's modules text_model.encoder...: loading
    # drops the prefix, and so must the check.
    prefixed = {
        key.replace("text_encoder.", "text_encoder.text_model.", 1): tensor
        for key, tensor in files["text_encoder"].items()
    }
    assert adapters.load("prefixed", prefixed, "prefixed") == len(prefixed) // 2
    assert adapters.check(prefixed, "prefixed") == len(prefixed)


def test_clip_strength_scales_both_text_encoders(adapters, pipe, files, base, base_text):
    both = {**files["unet"], **files["text_encoder"], **files["text_encoder_2"]}
    assert adapters.check(both, "both") == len(both)
    adapters.load("both", both, "both")
    assert pipe.get_list_adapters() == {attr: ["both"] for attr in ("unet", *TEXT_ENCODERS)}
    unet_only = with_adapters(adapters, on("both", 1.0, 0.0))
    for ours, theirs in zip(text_outputs(pipe), base_text, strict=True):
        assert torch.equal(ours, theirs)
    with_clip = with_adapters(adapters, on("both", 1.0, 1.0))
    for ours, theirs in zip(text_outputs(pipe), base_text, strict=True):
        assert not torch.allclose(ours, theirs, atol=1e-3)
    assert np.abs(with_clip - unet_only).mean() > VISIBLE
    # clip_strength 0 is the UNet LoRA alone, exactly.
    adapters.load("unet", files["unet"], "unet")
    assert np.array_equal(with_adapters(adapters, on("unet")), unet_only)


def test_lora_markers_name_sdxl_keys_and_no_flux_module(pipe, files):
    kohya, diffusers = kohya_sdxl(pipe, files, alpha=3.0)
    unet_and_te2 = [key for key in diffusers if not key.startswith("text_encoder.")]
    kohya_unet_and_te2 = [key for key in kohya if not key.startswith("lora_te1_")]
    for key in unet_and_te2 + kohya_unet_and_te2:
        assert any(marker in key for marker in FAMILY.lora_markers), key
    flux = get_family("flux").build_tiny()
    flux_names = [name for name, _ in flux.transformer.named_modules()]
    flux_names += ["lora_unet_double_blocks_0_img_attn_qkv", "lora_te1_text_model_encoder_layers_0"]
    assert not [name for name in flux_names if any(m in name for m in FAMILY.lora_markers)]
