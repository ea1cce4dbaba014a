"""The wan family: tiny WanPipeline, production-default video, job rules and Wan LoRA formats
(what every family keeps is in tests/test_family_contract.py)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline
from PIL import Image

from deployments import load_pipeline
from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.errors import InvalidRequest
from deployments.media import encode_video
from deployments.schemas import GenerationJob, VideoRequest
from deployments.wan import FAMILY, LORA_TARGETS, check_job, pipeline_kwargs
from tests.adapter_helpers import from_file, loaded
from tests.family_helpers import pipeline_output, production_job
from tests.lora_files import lora_tensors
from tests.lora_formats import WAN_ORIGINAL_NAMES as ORIGINAL_NAMES

PROMPT = "a red fox in the snow"
SMALL = {"width": 128, "height": 96, "num_frames": 9, "num_inference_steps": 2}
# Musubi/ComfyUI files vs the same LoRA in diffusers keys differ only in where alpha/rank is
# multiplied in; measured max abs pixel difference (floats in [0, 1]) with alpha/rank 0.75:
# 9.6e-5 (8e-6 in the latents, which the tiny VAE decoder amplifies). Without alpha/rank: 0.56.
FORMAT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("wan", "tiny://wan")


@pytest.fixture(scope="module")
def files(pipe):
    """LoRA tensors made from the bare model, before any test wraps its layers with peft's."""
    return {
        "a": lora_tensors(pipe.transformer, "transformer", 1, targets=LORA_TARGETS),
        "original": original_wan_lora(pipe, seed=5, rank=4, alpha=3.0),
        "unscaled": original_wan_lora(pipe, seed=5, rank=4, alpha=4.0)["diffusers"],
    }


@pytest.fixture(scope="module")
def base(pipe, files):
    return video(pipe)


@pytest.fixture
def adapters(pipe, files, base):
    """A PipelineAdapters on the shared pipeline; each test's adapters are deleted after it."""
    adapters = PipelineAdapters(pipe, FAMILY)
    yield adapters
    for name in loaded(pipe):
        adapters.delete(name)


def video(pipe, prompt: str = PROMPT, seed: int = 0) -> np.ndarray:
    """(frames, height, width, 3) floats in [0, 1] of a small clip."""
    output = pipeline_output(pipe, prompt, seed, **SMALL, guidance_scale=FAMILY.defaults.cfg)
    return output.frames[0]


def with_adapters(adapters, *active: ActiveAdapter) -> np.ndarray:
    adapters.activate(list(active))
    return video(adapters.pipe)


def on(name: str, strength: float = 1.0) -> ActiveAdapter:
    return ActiveAdapter(name, strength, strength)


def job(**changes) -> GenerationJob:
    """A job at the production defaults, as the ingress resolves it."""
    return production_job(FAMILY, PROMPT, **changes)


def original_wan_lora(pipe, seed: int, rank: int, alpha: float) -> dict[str, dict]:
    """One LoRA over every attention and feed-forward Linear of each block, in the ComfyUI
    (`diffusion_model.blocks.0.self_attn.q.lora_down`) and musubi-tuner
    (`lora_unet_blocks_0_self_attn_q.lora_down`) layouts, both scaled by alpha/rank at load, and
    in diffusers keys with alpha/rank folded into lora_B. No two layouts share a tensor."""
    generator = torch.Generator().manual_seed(seed)
    comfy, musubi, diffusers = {}, {}, {}
    for i, block in enumerate(pipe.transformer.blocks):
        for theirs, ours in ORIGINAL_NAMES.items():
            linear = block.get_submodule(ours)
            down = torch.randn(rank, linear.in_features, generator=generator)
            down /= math.sqrt(linear.in_features)
            up = torch.randn(linear.out_features, rank, generator=generator) / math.sqrt(rank)
            stem = f"blocks.{i}.{theirs}"
            for layout, prefix in (
                (comfy, f"diffusion_model.{stem}"),
                (musubi, "lora_unet_" + stem.replace(".", "_")),
            ):
                layout[f"{prefix}.lora_down.weight"] = down.clone()
                layout[f"{prefix}.lora_up.weight"] = up.clone()
                layout[f"{prefix}.alpha"] = torch.tensor(alpha)
            diffusers[f"transformer.blocks.{i}.{ours}.lora_A.weight"] = down
            diffusers[f"transformer.blocks.{i}.{ours}.lora_B.weight"] = up * (alpha / rank)
    return {"comfy": comfy, "musubi": musubi, "diffusers": diffusers}


def test_production_defaults_give_33_frames_of_832x480_as_animated_webp(pipe):
    defaults = FAMILY.defaults
    assert (defaults.width, defaults.height, defaults.steps, defaults.cfg) == (832, 480, 30, 6.0)
    assert (defaults.length, defaults.fps) == (33, 16)
    multiple = FAMILY.size_multiple(pipe)
    assert defaults.width % multiple == 0 and defaults.height % multiple == 0
    with torch.inference_mode():
        output = pipe(
            **pipeline_kwargs(job()),
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pil",
        )
    frames = output.frames[0]  # what base.py hands to encode_video
    assert len(frames) == 33
    assert {frame.size for frame in frames} == {(832, 480)}
    data = encode_video(list(frames), FAMILY.media_type, defaults.fps)
    with Image.open(io.BytesIO(data)) as webp:
        assert webp.format == "WEBP" and webp.is_animated
        assert webp.n_frames == 33
        assert webp.size == (832, 480)
        for index in range(webp.n_frames):
            webp.seek(index)
            webp.load()  # Pillow reads a frame's duration when it decodes the frame
            assert abs(webp.info["duration"] - 1000 / 16) <= 1


def test_tiny_wan_samples_with_unipc(pipe):
    assert isinstance(pipe, WanPipeline)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)


def test_pipeline_kwargs_map_the_video_fields():
    kwargs = pipeline_kwargs(job(negative_prompt="blurry", length=49, steps=4, cfg=5.0))
    assert kwargs == {
        "prompt": PROMPT,
        "negative_prompt": "blurry",
        "width": 832,
        "height": 480,
        "num_frames": 49,
        "num_inference_steps": 4,
        "guidance_scale": 5.0,
    }


def test_family_serves_video_requests_as_webp():
    assert FAMILY.endpoint == "wan2.6"
    assert FAMILY.request_model is VideoRequest
    assert FAMILY.output == "video" and FAMILY.media_type == "image/webp"
    assert FAMILY.lora_components == ("transformer",)


@pytest.mark.parametrize("length", [1, 33, 49, 81])
def test_lengths_of_4k_plus_1_frames_are_accepted(length):
    check_job(job(length=length))


@pytest.mark.parametrize("length", [32, 34, 48])
def test_other_lengths_are_refused_naming_the_rule(length):
    with pytest.raises(InvalidRequest) as error:
        check_job(job(length=length))
    assert error.value.message == (
        f"length: must be 4k+1 frames for Wan (e.g. 33, 49, 81), got {length}"
    )


@pytest.mark.parametrize("layout", ["comfy", "musubi"])
def test_original_wan_lora_matches_its_diffusers_conversion(
    adapters, files, base, tmp_path, layout
):
    # As a replica does: the file's tensors are checked, then the same tensors loaded.
    tensors = from_file(tmp_path, files["original"][layout])
    blocks = len(adapters.pipe.transformer.blocks)
    assert adapters.check(tensors, layout) == 2 * len(ORIGINAL_NAMES) * blocks
    assert all(torch.equal(tensors[key], files["original"][layout][key]) for key in tensors)
    assert adapters.load(layout, tensors, layout) == len(ORIGINAL_NAMES) * blocks
    adapters.load("diffusers", files["original"]["diffusers"], "diffusers")
    adapters.load("unscaled", files["unscaled"], "unscaled")
    converted = with_adapters(adapters, on(layout))
    assert np.abs(converted - base).mean() > 0.02
    assert np.abs(converted - with_adapters(adapters, on("diffusers"))).max() < FORMAT_TOLERANCE
    # alpha == rank gives scale 1 instead of 0.75: a different video, far beyond rounding,
    # shows alpha/rank was applied.
    assert np.abs(converted - with_adapters(adapters, on("unscaled"))).max() > 0.1


def test_lora_markers_find_wan_keys_in_every_layout_and_no_other_family(files):
    wan_keys = [*files["a"], *files["original"]["comfy"], *files["original"]["musubi"]]
    assert all(any(m in key for m in FAMILY.lora_markers) for key in wan_keys)
    other_families = [
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
        "transformer.transformer_blocks.0.ff_context.net.2.lora_B.weight",
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "diffusion_model.double_blocks.0.txt_attn.proj.lora_up.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.lora_up.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight",
        "lora_unet_transformer_blocks_0_img_mlp_net_0_proj.lora_down.weight",
        "diffusion_model.layers.0.attention.to_q.lora_A.weight",
        "transformer.layers.0.feed_forward.w1.lora_A.weight",
    ]
    assert not [key for key in other_families if any(m in key for m in FAMILY.lora_markers)]
