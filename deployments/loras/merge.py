"""Merging LoRAs into one file that applies what the stack `[(a, ratio_a), (b, ratio_b)]` does.

The merge is exact, in the "concatenated rank" form: a stack adds `sum_i r_i * s_i * B_i @ A_i`
to each layer (ratio r_i, scale s_i = alpha_i / rank_i), which equals `B @ A` with
`A = cat(A_i)` along the rank and `B = cat(r_i * s_i * B_i)`. The merged file carries no alpha
(alpha = rank, scale 1), so at strength 1 it reproduces the stack; a module that only some inputs
touch is kept with those inputs' blocks. The rank is the sum of the inputs' ranks, so the file is
as large as the inputs together (kohya's `merge_lora` can also re-factor to a lower rank with an
SVD, which is approximate; we do not).

The factors are read from the peft layers diffusers built when it loaded each input, so every
format conversion and alpha convention diffusers applies at serving time is applied here too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save as save_safetensors
from torch import nn

from deployments.adapters import PipelineAdapters, PreparedAdapter, adapter_name_for
from deployments.errors import LoraIncompatible

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
"""peft key stem (`transformer.blocks.0.attn.to_q`) -> (lora_A weight, lora_B weight, scale)."""


def adapter_factors(components: dict[str, nn.Module], adapter_name: str, label: str) -> Factors:
    """The A and B matrices and base scale (alpha / rank, before any strength) of one loaded
    adapter, in every component it touches."""
    factors: Factors = {}
    for attr, component in components.items():
        for module_name, module in component.named_modules():
            if not isinstance(module, BaseTunerLayer) or adapter_name not in getattr(
                module, "lora_A", {}
            ):
                continue
            if adapter_name in getattr(module, "lora_magnitude_vector", {}):
                raise LoraIncompatible(
                    f"Failed to load LoRA: {label}: a DoRA adapter cannot be merged by "
                    "concatenation"
                )
            rank = module.r[adapter_name]
            alpha = module.lora_alpha[adapter_name]
            rslora = module.use_rslora.get(adapter_name, False)
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            factors[f"{attr}.{module_name}"] = (
                module.lora_A[adapter_name].weight.detach().float().cpu(),
                module.lora_B[adapter_name].weight.detach().float().cpu(),
                float(scale),
            )
    return factors


def concatenate(weighted: list[tuple[Factors, float]]) -> dict[str, torch.Tensor]:
    """The merged file's tensors (peft key layout, no alpha) from each input's factors and
    ratio. Concatenation runs along dim 0 of A and dim 1 of B, which is the rank for Linear and
    Conv layers alike."""
    stems = list(dict.fromkeys(stem for factors, _ in weighted for stem in factors))
    tensors = {}
    for stem in stems:
        downs, ups = [], []
        for factors, ratio in weighted:
            if stem in factors:
                down, up, scale = factors[stem]
                downs.append(down)
                ups.append(up * (ratio * scale))
        tensors[f"{stem}.lora_A.weight"] = torch.cat(downs, dim=0).contiguous()
        tensors[f"{stem}.lora_B.weight"] = torch.cat(ups, dim=1).contiguous()
    return tensors


def merged_file(
    tensors: dict[str, torch.Tensor],
    family: str,
    inputs: list[tuple[str, float]],
    trigger_words: list[str],
) -> bytes:
    """The merged `.safetensors` bytes, with metadata saying what it was made from."""
    metadata = {
        "loraplex.family": family,
        "loraplex.merged_from": json.dumps([{"name": n, "ratio": r} for n, r in inputs]),
    }
    if trigger_words:
        metadata["trigger_words"] = json.dumps(trigger_words)
    return save_safetensors(tensors, metadata=metadata)


@dataclass(frozen=True)
class MergeInput:
    """One adapter of the stack to merge."""

    key: str
    """Its file version (`LoraRef.key`)."""
    label: str
    ratio: float
    hot_name: str | None
    """Its peft adapter name where the replica holds it hot; else it is loaded for the merge."""
    prepared: PreparedAdapter


def merge_stack(
    adapters: PipelineAdapters, inputs: list[MergeInput], trigger_words: list[str]
) -> bytes:
    """The merged file of `inputs`. Inputs that are not hot are loaded under names of their own
    and deleted after, whatever happens; the caller runs this on the tensor thread under the
    replica's lock, so no generation sees them."""
    pipe, family = adapters.pipe, adapters.family
    components = {attr: getattr(pipe, attr, None) for attr in family.lora_components}
    components = {attr: component for attr, component in components.items() if component}
    weighted, temporary = [], []
    try:
        for item in inputs:
            adapter_name = item.hot_name
            if adapter_name is None:
                adapter_name = adapter_name_for(f"merge:{item.key}")
                adapters.load(adapter_name, adapters.file_tensors(item.prepared), item.label)
                temporary.append(adapter_name)
            kind = adapters.kind_of(adapter_name)
            if kind != "LoRA":  # a LoRA file holds A and B only: the rest would be lost
                raise LoraIncompatible(
                    f"Failed to load LoRA: {item.label}: a {kind} adapter cannot be merged into "
                    "a LoRA file"
                )
            weighted.append((adapter_factors(components, adapter_name, item.label), item.ratio))
    finally:
        for adapter_name in temporary:
            adapters.delete(adapter_name)
    sources = [(item.label, item.ratio) for item in inputs]
    return merged_file(concatenate(weighted), family.name, sources, trigger_words)
