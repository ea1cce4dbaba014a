"""Random-weight LoRAs for a loaded model: demo adapters, tests and benchmarks.

They use the diffusers/peft key layout (`<component>.<module>.lora_A.weight`) and real module
shapes, with weights large enough that a tiny model's output visibly changes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ATTENTION_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


def lora_tensors(
    model: nn.Module,
    prefix: str,
    seed: int,
    rank: int = 4,
    targets: tuple[str, ...] = ATTENTION_TARGETS,
    up_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """lora_A/lora_B pairs for every Linear of `model` whose name ends with one of `targets`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        name = name.removesuffix(".base_layer")  # peft wraps layers that held adapters
        if isinstance(module, nn.Linear) and name.endswith(targets):
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
            tensors[f"{prefix}.{name}.lora_A.weight"] = down / math.sqrt(module.in_features)
            tensors[f"{prefix}.{name}.lora_B.weight"] = up * up_scale / math.sqrt(rank)
    if not tensors:
        raise ValueError(f"no Linear layer of the model matches {targets}")
    return tensors


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Save as .safetensors, creating folders; tensors are made contiguous and unshared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
