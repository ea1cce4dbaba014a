"""Where each module of a LoRA file lands in the model, as diffusers' key conversion places it.

Converters rename modules, split a fused one into several (Flux's `qkv` into to_q, to_k and
to_v, by rows), and drop the keys they do not know with at most a log line. To see all three
for every module, the file's modules are converted once more as rank-1 probes whose values
number their module, rows and columns: what comes out says exactly which rows and columns of
which source module each converted module holds, and which source modules came out nowhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Probe values are module number * this + row or column number + 1, exact in float64.
_STRIDE = 2**26


@dataclass(frozen=True)
class ProbeModule:
    """One module of a file, as the probe writes it: the file's own key names, its shape."""

    down_key: str
    up_key: str
    alpha_key: str | None
    rows: int
    columns: int


@dataclass(frozen=True)
class Target:
    """A part of one source module that lands on one model module."""

    path: str
    """`<component>.<module path>` in the pipeline."""
    rows: torch.Tensor
    columns: torch.Tensor


class ProbeError(ValueError):
    """The conversion mixed modules in a way the probe cannot read."""


def probe(
    modules: dict[str, ProbeModule],
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    passthrough: dict[str, torch.Tensor] | None = None,
    positions: bool = True,
) -> dict[str, list[Target]]:
    """stem -> where its rows and columns land, by `convert` (a file's conversion to
    `<component>.<module>.lora_{A,B}.weight`). Stems the conversion dropped are absent.
    `passthrough` tensors (biases, magnitudes) go in as they are, so the converter sees the
    file's whole key set. `positions=False`: only which modules land where (each target's
    rows and columns empty), read from one value per matrix."""
    stems = list(modules)
    probes = {key: tensor.clone() for key, tensor in (passthrough or {}).items()}
    for number, stem in enumerate(stems):
        module = modules[stem]
        offset = number * _STRIDE + 1
        probes[module.down_key] = (
            torch.arange(module.columns, dtype=torch.float64).reshape(1, module.columns) + offset
        )
        probes[module.up_key] = (
            torch.arange(module.rows, dtype=torch.float64).reshape(module.rows, 1) + offset
        )
        if module.alpha_key is not None:
            probes[module.alpha_key] = torch.tensor(1.0, dtype=torch.float64)  # scale 1
    converted = convert(probes)
    targets: dict[str, list[Target]] = {}
    for key, up in converted.items():
        if not key.endswith(".lora_B.weight") or up.ndim < 2:
            continue
        path = key.removesuffix(".lora_B.weight")
        down = converted.get(f"{path}.lora_A.weight")
        if down is None:
            continue
        if not positions:
            number = int((up.reshape(-1)[0].item() - 1) // _STRIDE)
            if 0 <= number < len(stems):
                empty = torch.empty(0, dtype=torch.long)
                targets.setdefault(stems[number], []).append(Target(path, empty, empty))
            continue
        number, rows = _decode(up)
        down_number, columns = _decode(down)
        if number is None or number != down_number or not 0 <= number < len(stems):
            raise ProbeError(f"{path}: the key conversion mixed the file's modules")
        targets.setdefault(stems[number], []).append(Target(path, rows, columns))
    return targets


def _decode(tensor: torch.Tensor) -> tuple[int | None, torch.Tensor]:
    """(module number, row or column numbers) of a converted probe matrix."""
    values = tensor.detach().double().reshape(-1) - 1
    numbers = torch.div(values, _STRIDE, rounding_mode="floor")
    if values.numel() == 0 or not bool((numbers == numbers[0]).all()):
        return None, values.long()
    return int(numbers[0]), (values - numbers[0] * _STRIDE).long()
