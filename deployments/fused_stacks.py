"""Compiled generation's adapter state: every request's whole stack fused into the denoiser.

A compiled denoiser block runs a graph that dynamo guards on the Python state its peft layers
read in `forward`: the `disable_adapters` flag and whether `merged_adapters` is empty (the
active names, scales and ModuleDict keys are read only on the unfused path). So in compiled
mode every denoiser LoRA layer is always merged, by one fixed entry (`FUSED_MARKER`, never an
adapter's name: dynamo would guard each name), and its forward is always `base_layer(x)`: one
graph whatever the stack. A layer the stack uses computes with W + sum(scaling * B @ A) over
the stack's adapters on it; the others with W. Ranks do not matter: each B @ A has W's shape,
so adapters of different ranks need no padding. Text encoders are not compiled and keep peft's
unfused path.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer

FUSED_MARKER = "lx_fused"


def unfusable_reason(layers: dict[str, LoraLayer], adapter_name: str, prefix: str) -> str | None:
    """Why an adapter's denoiser layers cannot be fused (DoRA and other peft variants, a LoRA
    bias), naming the first such layer; None when they all can."""
    for path, module in layers.items():
        if not path.startswith(prefix) or adapter_name not in module.lora_A:
            continue
        variant = module.lora_variant.get(adapter_name)
        if variant is not None:
            kind = "DoRA" if module.use_dora.get(adapter_name) else type(variant).__name__
            return f"{kind} layer {path}"
        if module.lora_bias.get(adapter_name):
            return f"LoRA bias in {path}"
    return None


def fused_weight(
    module: LoraLayer, names: list[str], kept: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """kept + sum over `names` of scaling * B @ A (the scales the activation set), written into
    `out` where the layer is a plain Linear; a new tensor otherwise (peft's delta weight)."""
    with torch.no_grad():  # out= takes no tensor that requires grad
        if isinstance(module, LoraLinear) and not module.fan_in_fan_out:
            source = kept
            for name in names:
                lora_a = module.lora_A[name].weight.to(kept.dtype)
                lora_b = module.lora_B[name].weight.to(kept.dtype)
                torch.addmm(source, lora_b, lora_a, alpha=module.scaling[name], out=out)
                source = out
            return out
        fused = kept
        for name in names:
            fused = fused + module.get_delta_weight(name).to(kept.dtype)
        return fused


def mark_merged(module: LoraLayer) -> None:
    """The fixed merged state of compiled mode: adapters enabled, one marker entry."""
    if module.disable_adapters:
        module.enable_adapters(True)  # else peft's forward would unmerge
    module.merged_adapters.append(FUSED_MARKER)
