"""Writing real LoRA files for the tiny models, in the formats users bring."""

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
    """diffusers/peft keys (`<prefix>.<module>.lora_A.weight`) for every Linear named by
    `targets`, with random weights large enough to change a tiny model's output."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(targets):
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
            tensors[f"{prefix}.{name}.lora_A.weight"] = down / math.sqrt(module.in_features)
            tensors[f"{prefix}.{name}.lora_B.weight"] = up * up_scale / math.sqrt(rank)
    if not tensors:
        raise ValueError(f"no Linear matched {targets}")
    return tensors


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
