"""What an adapter file is: its format, the family it fits, rank, alpha, targets, trigger words.

Read from key names, shapes and safetensors metadata only; loading and key conversion stay with
diffusers (`lora_state_dict` / `load_lora_weights`). This is for listing files, validating
uploads, and `trigger_word: "auto"`.
"""

from __future__ import annotations

import math
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
from deployments.loras.metadata import (
    LORA_ADAPTER_METADATA_KEY,
    TRIGGER_METADATA_KEYS,
    lora_metadata,
)
from deployments.loras.tensors import check_values


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


def inspect_lora(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str = "adapter"
) -> LoraFacts:
    """The file's facts; LoraIncompatible naming the key of a metadata value it cannot use."""
    keys = list(tensors)
    stated = lora_metadata(metadata, name)
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
    alpha = alphas.most_common(1)[0][0] if alphas else stated.alpha
    family = stated.family or detect_lora_family(keys)
    return LoraFacts(
        format=detect_format(keys, metadata),
        kind=adapter_kind(tensors),
        family=family,
        rank=ranks.most_common(1)[0][0] if ranks else None,
        alpha=alpha,
        targets=_targets(keys, family),
        trigger_words=stated.trigger_words,
        tensor_count=len(keys),
    )


def apply_metadata_alpha(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], label: str = "adapter"
) -> dict[str, torch.Tensor]:
    """The tensors with the `lora_alpha` of diffusers' adapter metadata folded into lora_B.

    diffusers reads that metadata only when it opens the file itself; the service hands it the
    tensors it read, which diffusers would load at alpha = rank. Folding alpha / rank (peft's
    scale, `alpha_pattern` / `rank_pattern` and rsLoRA included) into lora_B gives the same
    layers diffusers builds from the file. Files without that metadata are returned as given
    (kohya-style files carry alpha as `.alpha` tensors, which diffusers applies). A rank the
    metadata states must be the matrix's: peft would build a layer of that rank, and the file's
    matrix would not fit it."""
    configs = lora_metadata(metadata, label, keys=(LORA_ADAPTER_METADATA_KEY,)).adapters
    if not configs:
        return tensors
    folded = dict(tensors)
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        config = configs.get(component)
        if config is None or not rest.endswith(".lora_B.weight") or tensor.ndim < 2:
            continue
        module = rest.removesuffix(".lora_B.weight")
        rank, from_pattern = int(tensor.shape[1]), config.rank_pattern_for(module)
        stated, field = (from_pattern, "rank_pattern") if from_pattern else (config.r, "r")
        if stated is not None and stated != rank:
            raise LoraIncompatible(
                f"Failed to load LoRA: {label}: metadata {LORA_ADAPTER_METADATA_KEY}: "
                f"{component}.{field} says rank {stated} for {module}, its {key} has rank {rank}"
            )
        alpha = config.alpha_for(module)
        if alpha is None:
            continue
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        if scale != 1:
            folded[key] = tensor * scale
            check_values([(key, folded[key])], label)  # a float16 matrix may overflow
    return folded


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


def trigger_words(metadata: dict[str, str], name: str = "adapter") -> list[str]:
    """Trigger words a file's metadata names (loraplex's own, kohya's `ss_*`, modelspec);
    LoraIncompatible naming the key of a value that is not a list of words."""
    return lora_metadata(metadata, name, keys=TRIGGER_METADATA_KEYS).trigger_words
