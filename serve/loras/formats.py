"""What an adapter file is: its format, the family it fits, rank, alpha, targets, trigger words.

Read from key names, shapes and safetensors metadata only; loading and key conversion stay with
diffusers (`lora_state_dict` / `load_lora_weights`). This is for listing files, validating
uploads, and `trigger_word: "auto"`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from deployments.family import detect_lora_family, get_family

LoraFormat = Literal["diffusers", "kohya", "ai-toolkit", "musubi", "comfyui", "unknown"]

# kohya sd-scripts / musubi-tuner name the module with underscores and keep alpha beside it.
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_DOWN_KEYS = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight", "_lora.down.weight")
_TRIGGER_METADATA_KEYS = (
    "trigger_word",
    "trigger_words",
    "ss_trigger_words",
    "modelspec.trigger_phrase",
)


class LoraFacts(BaseModel):
    """What `GET /loras` reports for one file."""

    model_config = ConfigDict(extra="forbid")

    format: LoraFormat
    family: str | None = Field(description="The family the keys are for; None when unknown.")
    rank: int | None = Field(description="The most common rank over the file's matrices.")
    alpha: float | None = Field(description="The most common alpha; None means alpha = rank.")
    targets: list[str] = Field(description="transformer/unet and the text encoders it touches.")
    trigger_words: list[str]
    tensor_count: int


def detect_format(keys: list[str]) -> LoraFormat:
    """The convention the key names follow."""
    if any(key.startswith("lora_unet_blocks_") for key in keys):
        return "musubi"  # musubi-tuner's Wan/HunyuanVideo files: kohya naming over DiT blocks
    if any(key.startswith(_KOHYA_PREFIXES) for key in keys):
        return "kohya"
    if any(key.startswith("diffusion_model.") for key in keys):
        return "comfyui"
    if any(".lora_A." in key or ".lora_B." in key for key in keys):
        return "diffusers"
    if any(".lora_down." in key or ".lora.down." in key or "_lora.down." in key for key in keys):
        return "diffusers"  # diffusers' older attention-processor layouts
    return "unknown"


def inspect_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraFacts:
    keys = list(tensors)
    ranks = Counter(
        int(tensor.shape[0])
        for key, tensor in tensors.items()
        if key.endswith(_DOWN_KEYS) and tensor.ndim >= 2
    )
    alphas = Counter(
        round(float(tensor.reshape(-1)[0]), 4)
        for key, tensor in tensors.items()
        if key.endswith(".alpha") and tensor.numel() == 1
    )
    alpha = alphas.most_common(1)[0][0] if alphas else _metadata_alpha(metadata)
    family = metadata.get("loraplex.family") or detect_lora_family(keys)
    return LoraFacts(
        format=detect_format(keys),
        family=family,
        rank=ranks.most_common(1)[0][0] if ranks else None,
        alpha=alpha,
        targets=_targets(keys, family),
        trigger_words=trigger_words(metadata),
        tensor_count=len(keys),
    )


def _metadata_alpha(metadata: dict[str, str]) -> float | None:
    for key in ("ss_network_alpha", "lora_alpha"):
        try:
            return float(metadata[key])
        except (KeyError, ValueError):
            continue
    return None


def _targets(keys: list[str], family: str | None) -> list[str]:
    """The pipeline components the file's keys address, named as the family's pipeline does."""
    denoiser = get_family(family).denoiser_component if family else "denoiser"
    found = set()
    for key in keys:
        if key.startswith(("lora_te1_", "lora_te_")):
            found.add("text_encoder")
        elif key.startswith(("lora_te2_", "lora_te3_")):
            found.add("text_encoder_" + key[len("lora_te") : len("lora_te") + 1])
        elif key.startswith(("text_encoder.", "text_encoder_2.", "text_encoder_3.")):
            found.add(key.partition(".")[0])
        else:
            found.add(denoiser)
    return sorted(found)


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """Trigger words a file's metadata names (loraplex's own, kohya's `ss_*`, modelspec)."""
    words: list[str] = []
    for key in _TRIGGER_METADATA_KEYS:
        value = metadata.get(key)
        if not value:
            continue
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if isinstance(parsed, str):
            parsed = re.split(r"\s*,\s*", parsed)
        if isinstance(parsed, list):
            words += [str(word).strip() for word in parsed if str(word).strip()]
    return list(dict.fromkeys(words))
