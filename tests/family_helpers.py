"""Helpers the model-family tests share: rendering a tiny pipeline to floats, the production-
default job of a family, and the LoRA builder for models whose original code fuses q, k and v.

Each family module (tests/test_family_*.py, tests/test_adapters.py for Flux) keeps only its own
sizes, prompts and tolerances, and binds these to them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from deployments.family import get_family
from deployments.media import encode_image
from deployments.schemas import GenerationJob

# The input image of a qwen_image_edit job in `render`.
EDIT_IMAGE = encode_image(
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
    "image/png",
)


def pipeline_output(pipe, prompt: str, seed: int, **kwargs):
    """The pipeline's output for `prompt` as floats in [0, 1] (`.images`, or `.frames` for a
    video), from a CPU generator seeded with `seed`."""
    with torch.inference_mode():
        return pipe(
            prompt,
            **kwargs,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )


def job_output(spec, pipe, job: GenerationJob):
    """The output of the pipeline call deployments/base.py makes for `job`, as floats."""
    with torch.inference_mode():
        return pipe(
            **spec.pipeline_kwargs(job),
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="np",
        )


def render(pipe, family: str) -> np.ndarray:
    """A 64x64, 2-step image (5 frames for Wan) as floats in [0, 1]."""
    spec = get_family(family)
    job = GenerationJob(
        prompt="a red fox in the snow",
        negative_prompt="",
        width=64,
        height=64,
        steps=2,
        cfg=spec.defaults.cfg,
        seed=0,
        adapters=[],
        length=5 if spec.output == "video" else None,
        image=EDIT_IMAGE if family == "qwen_image_edit" else None,
    )
    out = job_output(spec, pipe, job)
    return np.asarray(out.frames[0] if spec.output == "video" else out.images[0])


def grey_levels(spec, pipe, job: GenerationJob) -> np.ndarray:
    """The image of `job` in grey levels (0-255), from the pipeline call deployments/base.py
    makes."""
    return job_output(spec, pipe, job).images[0] * 255.0


def differs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def production_job(spec, prompt: str, **changes) -> GenerationJob:
    """A job at the family's production defaults, as the ingress resolves it."""
    defaults = spec.defaults.model_dump()
    fields = {"prompt": prompt, "negative_prompt": "", "seed": 0, "adapters": [], **defaults}
    return GenerationJob(**{**fields, **changes})


def fused_qkv_lora(
    layers: list[tuple[str, str]], dim: int, out: str, seed: int, rank: int, alpha: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(kohya tensors, the same LoRA in diffusers keys) for attention layers whose original
    model fuses q, k and v in one `qkv` matrix (Flux, Z-Image).

    `layers` pairs each attention's diffusers path (`transformer.<path>`) with its kohya stem;
    kohya writes `<stem>_qkv` and `<stem>_<out>` (the output projection) with lora_up unscaled
    and `.alpha`, to be scaled by alpha / rank. The diffusers twin shares the qkv lora_down
    between to_q, to_k and to_v, and carries lora_B * alpha / rank."""
    generator = torch.Generator().manual_seed(seed)
    scale = alpha / rank
    kohya, diffusers = {}, {}

    def pair(out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.randn(rank, dim, generator=generator) / math.sqrt(dim)
        return down, torch.randn(out_features, rank, generator=generator)

    for ours, theirs in layers:
        down, up = pair(3 * dim)
        kohya[f"{theirs}_qkv.lora_down.weight"] = down
        kohya[f"{theirs}_qkv.lora_up.weight"] = up
        kohya[f"{theirs}_qkv.alpha"] = torch.tensor(alpha)
        for target, rows in zip(("to_q", "to_k", "to_v"), up.split(dim), strict=True):
            diffusers[f"{ours}.{target}.lora_A.weight"] = down
            diffusers[f"{ours}.{target}.lora_B.weight"] = rows * scale
        down, up = pair(dim)
        kohya[f"{theirs}_{out}.lora_down.weight"] = down
        kohya[f"{theirs}_{out}.lora_up.weight"] = up
        kohya[f"{theirs}_{out}.alpha"] = torch.tensor(alpha)
        diffusers[f"{ours}.to_out.0.lora_A.weight"] = down
        diffusers[f"{ours}.to_out.0.lora_B.weight"] = up * scale
    return kohya, diffusers
