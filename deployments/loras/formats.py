"""What an adapter file is: its format, the family it fits, rank, alpha, targets, trigger words.

Read from key names, shapes and safetensors metadata only; loading and key conversion stay with
diffusers (`lora_state_dict` / `load_lora_weights`). This is for listing files, validating
uploads, and `trigger_word: "auto"`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import torch
from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import LoraIncompatible
from deployments.family import detect_lora_family, get_family
from deployments.lora_anatomy import (
    DOWN_SUFFIXES,
    AdapterKind,
    LoraFormat,
    adapter_kind,
    detect_format,
)

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # as diffusers' lora_base names it

_TRIGGER_METADATA_KEYS = (
    "trigger_word",
    "trigger_words",
    "ss_trigger_words",
    "modelspec.trigger_phrase",
)


class LoraFacts(BaseModel):
    """What `GET /loras` reports for one file."""

    model_config = ConfigDict(extra="forbid")

    format: LoraFormat = Field(description="The naming convention of the trainer that wrote it.")
    kind: AdapterKind = Field(description="LoRA, DoRA, LoKr, LoHa or Control.")
    family: str | None = Field(description="The family the keys are for; None when unknown.")
    rank: int | None = Field(description="The most common rank over the file's matrices.")
    alpha: float | None = Field(description="The most common alpha; None means alpha = rank.")
    targets: list[str] = Field(description="transformer/unet and the text encoders it touches.")
    trigger_words: list[str]
    tensor_count: int


def inspect_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraFacts:
    keys = list(tensors)
    # A LoRA's rank is its down matrix's first dimension; a LyCORIS module's, its factored
    # part's (LoKr: w2's, else w1's; LoHa: w1_b's).
    ranked = DOWN_SUFFIXES + (".lokr_w2_b", ".hada_w1_b")
    ranks = Counter(
        int(tensor.shape[0])
        for key, tensor in tensors.items()
        if key.endswith(ranked) and tensor.ndim >= 2
    )
    alphas = Counter(
        round(float(tensor.reshape(-1)[0]), 4)
        for key, tensor in tensors.items()
        if key.endswith(".alpha") and tensor.numel() == 1
    )
    alpha = alphas.most_common(1)[0][0] if alphas else _metadata_alpha(metadata)
    family = metadata.get("loraplex.family") or detect_lora_family(keys)
    return LoraFacts(
        format=detect_format(keys, metadata),
        kind=adapter_kind(tensors),
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
    for config in adapter_configs(metadata).values():
        try:
            return float(config["lora_alpha"])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def adapter_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """component -> its peft LoraConfig fields, from diffusers' `lora_adapter_metadata` (what
    `save_lora_weights` writes: `{"transformer.r": 4, "transformer.lora_alpha": 8, ...}`)."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    configs: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, field = key.partition(".")
        if field:
            configs.setdefault(component, {})[field] = value
    return configs


def apply_metadata_alpha(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], label: str = "adapter"
) -> dict[str, torch.Tensor]:
    """The tensors with the `lora_alpha` of diffusers' adapter metadata folded into lora_B.

    diffusers reads that metadata only when it opens the file itself; the service hands it the
    tensors it read, which diffusers would load at alpha = rank. Folding alpha / rank (peft's
    scale, `alpha_pattern` / `rank_pattern` and rsLoRA included) into lora_B gives the same
    layers diffusers builds from the file. Files without that metadata are returned as given
    (kohya-style files carry alpha as `.alpha` tensors, which diffusers applies)."""
    configs = adapter_configs(metadata)
    if not configs:
        return tensors
    folded = dict(tensors)
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        config = configs.get(component)
        if config is None or not rest.endswith(".lora_B.weight") or tensor.ndim < 2:
            continue
        module = rest.removesuffix(".lora_B.weight")
        try:
            alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha"))
            rank = _pattern_value(config.get("rank_pattern"), module, tensor.shape[1])
            if alpha is None:
                continue
            alpha, rank = float(alpha), float(rank)
        except (TypeError, ValueError, re.error) as e:
            raise LoraIncompatible(
                f"Failed to load LoRA: {label}: {LORA_ADAPTER_METADATA_KEY}: unreadable "
                f"{component}.lora_alpha / rank ({e})"
            ) from e
        if rank <= 0:
            continue
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if scale != 1:
            folded[key] = tensor * scale
    return folded


def _pattern_value(patterns, module: str, default):
    """peft's per-module override: a pattern matches a module name or its dotted suffix."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


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
