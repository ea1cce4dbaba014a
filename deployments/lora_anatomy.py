"""What a LoRA file holds, told from its key names and shapes alone: the tensors by kind, the
adapter kind (LoRA, DoRA, LoKr, LoHa, Control) and the naming convention (format) of its trainer.

The check (`lora_check.py`) and `GET /loras` (`deployments/loras/formats.py`) both read this, so a
file is described the same way in a refusal and in a listing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch

LoraFormat = Literal[
    "diffusers",
    "kohya",
    "ai-toolkit",
    "musubi",
    "comfyui",
    "onetrainer",
    "xlabs",
    "peft",
    "bfl",
    "unknown",
]
AdapterKind = Literal["LoRA", "DoRA", "LoKr", "LoHa", "Control"]

# The key endings of a LoRA's down (A) and up (B) matrices in every layout diffusers reads,
# xlabs' (`qkv_lora1.down.weight`) and diffusers' older text-encoder one included.
DOWN_SUFFIXES = (
    ".lora_A.weight",
    ".lora_down.weight",
    ".lora.down.weight",
    "_lora.down.weight",
    "_lora1.down.weight",
    "_lora2.down.weight",
    ".lora_linear_layer.down.weight",
)
UP_SUFFIXES = (
    ".lora_B.weight",
    ".lora_up.weight",
    ".lora.up.weight",
    "_lora.up.weight",
    "_lora1.up.weight",
    "_lora2.up.weight",
    ".lora_linear_layer.up.weight",
)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
ONETRAINER_PREFIX = "lora_transformer_"
PEFT_PREFIX = "base_model.model."
# FLUX.1's packed latent input: 16 VAE channels x 2 x 2. A Flux file whose input embedder's
# LoRA takes more (128: latents and control image side by side) is a Control LoRA.
FLUX_LATENT_CHANNELS = 64
_INPUT_EMBEDDERS = ("x_embedder", "img_in")

TensorKind = Literal[
    "lora_down",
    "lora_up",
    "alpha",
    "lora_bias",
    "dora_scale",
    "dora_magnitude",
    "lokr",
    "loha",
    "other",
]


def tensor_kind(key: str) -> TensorKind:
    """What one tensor of a LoRA file is, by its key."""
    stem, _, last = key.rpartition(".")
    if key.endswith(DOWN_SUFFIXES):
        return "lora_down"
    if key.endswith(UP_SUFFIXES):
        return "lora_up"
    if last == "alpha":
        return "alpha"
    if key.endswith((".lora_B.bias", ".lora_up.bias")):
        return "lora_bias"
    if last == "dora_scale":
        return "dora_scale"
    if last == "lora_magnitude_vector" or stem.endswith(".lora_magnitude_vector"):
        return "dora_magnitude"
    if last.startswith("lokr_"):
        return "lokr"
    if last.startswith("hada_"):
        return "loha"
    return "other"


_KIND_WORDS = {
    "lora_down": "down matrices",
    "lora_up": "up matrices",
    "alpha": "alphas",
    "lora_bias": "lora_B biases",
    "dora_scale": "DoRA scales",
    "dora_magnitude": "DoRA magnitudes",
    "lokr": "LoKr factors",
    "loha": "LoHa factors",
    "other": "other tensors",
}


@dataclass(frozen=True)
class FileAnatomy:
    """A file's tensors counted by kind, and what they make it."""

    counts: dict[str, int]
    kind: AdapterKind
    format: LoraFormat

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        keys = list(tensors)
        counts = Counter(tensor_kind(key) for key in keys)
        return cls(dict(counts), adapter_kind(tensors, counts), detect_format(keys, metadata))

    def describe(self) -> str:
        """`1008 down/up matrices, 504 alphas`: the kinds present, matrices first."""
        matrices = self.counts.get("lora_down", 0) + self.counts.get("lora_up", 0)
        parts = [f"{matrices} LoRA matrices"] if matrices else []
        parts += [
            f"{count} {_KIND_WORDS[kind]}"
            for kind, count in sorted(self.counts.items())
            if kind not in ("lora_down", "lora_up") and count
        ]
        return ", ".join(parts)


def adapter_kind(tensors: dict[str, torch.Tensor], counts: Counter | None = None) -> AdapterKind:
    counts = counts if counts is not None else Counter(tensor_kind(key) for key in tensors)
    if control_input_width(tensors) is not None:
        return "Control"
    if counts.get("lokr"):
        return "LoKr"
    if counts.get("loha"):
        return "LoHa"
    if counts.get("dora_scale") or counts.get("dora_magnitude"):
        return "DoRA"
    return "LoRA"


def control_input_width(tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(the module, its input width) of a Flux Control LoRA's input-embedder matrix
    (`x_embedder` in diffusers' names, `img_in` in BFL's), when it is wider than FLUX.1's
    latents; else None."""
    for key, tensor in tensors.items():
        if tensor_kind(key) != "lora_down" or tensor.ndim != 2:
            continue
        module = next(key.removesuffix(s) for s in DOWN_SUFFIXES if key.endswith(s))
        if module.rpartition(".")[2] in _INPUT_EMBEDDERS and tensor.shape[1] > FLUX_LATENT_CHANNELS:
            return module.rpartition(".")[2], int(tensor.shape[1])
    return None


def detect_format(keys: list[str], metadata: dict[str, str] | None = None) -> LoraFormat:
    """The convention the key names follow (and, for AI Toolkit's Flux files, which use
    diffusers' own names, the `software` its metadata names)."""
    if any(key.startswith("lora_unet_blocks_") for key in keys):
        return "musubi"  # musubi-tuner's Wan/HunyuanVideo files: kohya naming over DiT blocks
    if any(key.startswith(ONETRAINER_PREFIX) for key in keys):
        return "onetrainer"  # diffusers' module names, kohya's underscores and lora_down/up
    if any(key.startswith(KOHYA_PREFIXES) for key in keys):
        return "kohya"
    if any(key.startswith(PEFT_PREFIX) for key in keys):
        return "peft"  # peft's `save_pretrained` of a model it wraps
    if any("_lora1." in key or "_lora2." in key for key in keys):
        return "xlabs"
    if any(key.startswith("img_in.") or key.startswith("double_blocks.") for key in keys):
        return "bfl"  # BFL's own module names without a prefix (their Control LoRAs)
    if any(key.startswith("diffusion_model.") for key in keys):
        # AI Toolkit writes peft's lora_A/lora_B under ComfyUI's prefix; ComfyUI's own saver
        # and the trainers that follow it write lora_down/lora_up.
        if any(".lora_A." in key or ".lora_B." in key for key in keys):
            return "ai-toolkit"
        return "comfyui"
    if "ai-toolkit" in (metadata or {}).get("software", ""):
        return "ai-toolkit"
    if any(".lora_A." in key or ".lora_B." in key for key in keys):
        return "diffusers"
    if any(".lora_down." in key or ".lora.down." in key or "_lora.down." in key for key in keys):
        return "diffusers"  # diffusers' older attention-processor layouts
    return "unknown"


def text_encoder_prefix(key: str) -> str | None:
    """The text-encoder part a key addresses (`lora_te2_`, `text_encoder_2.`), or None for the
    denoiser."""
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_"):
        if key.startswith(prefix):
            return prefix
    first = key.partition(".")[0]
    return f"{first}." if first.startswith("text_encoder") else None
