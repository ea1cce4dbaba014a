"""Helpers the model-family tests share: rendering a tiny pipeline to floats, the production-
default job of a family, the LoRA builder for models whose original code fuses q, k and v, and
one `FamilyCase` per family for the contract every family keeps (tests/test_family_contract.py).

The family modules (tests/test_family_*.py, tests/test_adapters.py for Flux) check only what is
particular to their family, with their own sizes, prompts and tolerances.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from deployments import load_pipeline
from deployments.family import Family, get_family
from deployments.media import encode_image
from deployments.qwen_image import LORA_TARGETS as QWEN_LORA_TARGETS
from deployments.schemas import GenerationJob
from deployments.wan import LORA_TARGETS as WAN_LORA_TARGETS
from deployments.z_image import ATTENTION_TARGETS as Z_IMAGE_ATTENTION_TARGETS
from tests.lora_files import ATTENTION_TARGETS

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


def png(width: int, height: int, pattern: str = "gradient") -> bytes:
    """A PNG input image for the edit model: a colour gradient, or 32-pixel black and white
    checkers."""
    y, x = np.mgrid[0:height, 0:width]
    if pattern == "gradient":
        pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], axis=-1)
    else:
        pixels = np.repeat((((x // 32 + y // 32) % 2) * 255)[..., None], 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class FamilyCase:
    """One family as the contract tests see it: the small job its tiny pipeline renders, the
    job changes that must show, the layers a typical LoRA of it adapts, and what counts as a
    visible change. Everything else (pipeline class, denoiser, the layers our own training
    adapts) the contract reads from the family spec."""

    family: str
    job: dict[str, Any]
    """Job fields over the shared ones (a fox prompt, seed 0, 2 steps, the family's cfg)."""
    lora_targets: tuple[str, ...]
    """Name endings of the denoiser layers that the contract's main LoRA adapts."""
    lora_layers: int
    """How many layers of the tiny denoiser `lora_targets` match."""
    visible: float
    """The least mean absolute difference (floats in [0, 1]) that another seed or each of
    `changes` must make to the output."""
    lora_visible: float
    """The same for a rank-4 LoRA on `lora_targets`, and for a second LoRA stacked on it at
    half strength."""
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Job changes, by name, that must each visibly change the output."""

    @property
    def spec(self) -> Family:
        return get_family(self.family)

    def build(self):
        """A fresh tiny pipeline, as a deployment loads `tiny://<family>`."""
        return load_pipeline(self.family, f"tiny://{self.family}")

    def make_job(self, **changes) -> GenerationJob:
        fields = {"prompt": "a red fox in the snow", "negative_prompt": "", "seed": 0, "steps": 2}
        fields |= {"cfg": self.spec.defaults.cfg, "adapters": [], **self.job}
        return GenerationJob(**{**fields, **changes})

    def render(self, pipe, **changes) -> np.ndarray:
        """The output of the job with `changes`, as floats in [0, 1]: (height, width, 3) for an
        image, (frames, height, width, 3) for a video."""
        out = job_output(self.spec, pipe, self.make_job(**changes))
        return np.asarray(out.frames[0] if self.spec.output == "video" else out.images[0])

    @property
    def output_shape(self) -> tuple[int, ...]:
        job = self.make_job()
        frames = (job.length,) if self.spec.output == "video" else ()
        return (*frames, job.height, job.width, 3)


# Each family at the small sizes its own module renders. A threshold is at most two thirds of
# the differences measured with torch 2.13 on CPU (mean absolute difference, floats in [0, 1]).
CASES = {
    case.family: case
    for case in (
        # Measured: seed 0.13, prompt 0.014, negative prompt 0.065; LoRA 0.034, stacked 0.017.
        FamilyCase(
            family="flux",
            job={"width": 128, "height": 128},
            lora_targets=ATTENTION_TARGETS,  # both the double and the single blocks
            lora_layers=14,
            visible=0.005,
            lora_visible=0.01,
            changes={
                "prompt": {"prompt": "a blue car on a road"},
                "negative_prompt": {"negative_prompt": "grey fog"},
            },
        ),
        # Measured: seed 0.050, prompt 0.011, negative prompt 0.023; LoRA 0.048, stacked 0.046.
        FamilyCase(
            family="sdxl",
            job={"width": 128, "height": 128},
            lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
            lora_layers=96,
            visible=0.005,
            lora_visible=0.02,
            changes={
                "prompt": {"prompt": "a blue car on a road"},
                "negative_prompt": {"negative_prompt": "blurry"},
            },
        ),
        # 3 grey levels. Measured: seed 0.17, prompt 0.087, negative prompt 0.074, cfg 1 (no
        # guidance) 0.075; LoRA 0.13, stacked 0.091.
        FamilyCase(
            family="qwen_image",
            job={"width": 128, "height": 128},
            lora_targets=QWEN_LORA_TARGETS,
            lora_layers=8,
            visible=3 / 255,
            lora_visible=3 / 255,
            changes={
                "prompt": {"prompt": "a blue car on a road"},
                "negative_prompt": {"negative_prompt": "grey fog"},
                "cfg": {"cfg": 1.0},
            },
        ),
        # The input image is not the output's size, as the pipeline resizes it itself. 3 grey
        # levels. Measured: seed 0.16, prompt 0.070, input image 0.053; LoRA 0.13, stacked 0.098.
        FamilyCase(
            family="qwen_image_edit",
            job={"prompt": "make the sky red", "width": 320, "height": 192, "image": png(330, 200)},
            lora_targets=QWEN_LORA_TARGETS,
            lora_layers=8,
            visible=3 / 255,
            lora_visible=3 / 255,
            changes={
                "prompt": {"prompt": "turn it into a pencil drawing"},
                "image": {"image": png(330, 200, "checkers")},
            },
        ),
        # Measured: seed 0.12, prompt 0.075, negative prompt 0.098; LoRA 0.11, stacked 0.10.
        FamilyCase(
            family="wan",
            job={"width": 128, "height": 96, "length": 9},
            lora_targets=WAN_LORA_TARGETS,
            lora_layers=8,
            visible=0.05,
            lora_visible=0.05,
            changes={
                "prompt": {"prompt": "a blue car on a road"},
                "negative_prompt": {"negative_prompt": "grey fog"},
            },
        ),
        # Measured: seed 0.13, prompt 0.048, negative prompt 0.038; LoRA 0.082, stacked 0.11.
        FamilyCase(
            family="z_image",
            job={"width": 128, "height": 128},
            lora_targets=Z_IMAGE_ATTENTION_TARGETS,
            lora_layers=16,
            visible=0.01,
            lora_visible=0.02,
            changes={
                "prompt": {"prompt": "a blue house by the sea"},
                "negative_prompt": {"negative_prompt": "blurry"},
            },
        ),
    )
}
