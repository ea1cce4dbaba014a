"""LyCORIS LoKr and LoHa files: each module's weight delta from its factors, and where it goes.

A LyCORIS module is not a LoRA (B @ A), so diffusers cannot load it; what it applies is a dense
delta, W + strength * scale * dW, with
- LoKr: dW = kron(w1, w2), each of w1 and w2 whole or factored (w1 = w1_a @ w1_b);
- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b), the Hadamard product of two low-rank products;
and scale = alpha / rank (the rank of the factored part; 1 without alpha), as LyCORIS and
ComfyUI apply them. loraplex adds that delta into the base weight while the adapter is active
and puts the weight back after, as it fuses a single plain LoRA (`adapters.py`).

Which model module a file module is, and which rows of its delta each gets where the original
model fuses modules (Flux's `qkv`), is the same question diffusers answers for a LoRA of the
same names: `key_probe` asks it, with each module written as a LoRA of its shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deployments.key_probe import ProbeModule, Target
from deployments.lora_anatomy import KOHYA_PREFIXES, ONETRAINER_PREFIX

LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TUCKER_FACTORS = ("lokr_t2", "hada_t1", "hada_t2")


class LycorisError(ValueError):
    """A LyCORIS file loraplex cannot apply; the message says what and where."""


@dataclass(frozen=True)
class LycorisModule:
    """One module of a LoKr or LoHa file: its factors, alpha and the delta they make."""

    stem: str
    """The file's module name (`lora_unet_double_blocks_0_img_attn_qkv`)."""
    kind: str
    """"LoKr" or "LoHa"."""
    factors: dict[str, torch.Tensor]
    alpha: float | None

    @property
    def rank(self) -> int | None:
        """The rank of the factored part (LoKr: w2's if factored, else w1's), None if none."""
        for name in ("lokr_w2_b", "lokr_w1_b", "hada_w1_b"):
            if name in self.factors:
                return int(self.factors[name].shape[0])
        return None

    @property
    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if self.alpha and rank else 1.0

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the delta, columns flattened over a convolution's kernel."""
        if self.kind == "LoHa":
            return int(self.factors["hada_w1_a"].shape[0]), _columns(self.factors["hada_w1_b"])
        w1_rows, w1_cols = _product_shape(self.factors, "lokr_w1")
        w2_rows, w2_cols = _product_shape(self.factors, "lokr_w2")
        return w1_rows * w2_rows, w1_cols * w2_cols

    def delta(self) -> torch.Tensor:
        """scale * dW as a (rows, columns) float32 matrix."""
        f = {name: tensor.float() for name, tensor in self.factors.items()}
        if self.kind == "LoHa":
            left = f["hada_w1_a"] @ f["hada_w1_b"].flatten(1)
            right = f["hada_w2_a"] @ f["hada_w2_b"].flatten(1)
            return left * right * self.scale
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"].flatten(1) if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        return torch.kron(w1.flatten(1), w2.flatten(1)) * self.scale


def _columns(tensor: torch.Tensor) -> int:
    return int(math.prod(tensor.shape[1:]))


def _product_shape(factors: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
    if name in factors:
        return int(factors[name].shape[0]), _columns(factors[name])
    return int(factors[f"{name}_a"].shape[0]), _columns(factors[f"{name}_b"])


def modules_of(tensors: dict[str, torch.Tensor]) -> dict[str, LycorisModule]:
    """The file's LoKr / LoHa modules by stem; LycorisError for a file mixing kinds, a
    Tucker-decomposed convolution, or a module missing factors."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, name = key.rpartition(".")
        grouped.setdefault(stem, {})[name] = tensor
    modules = {}
    for stem, parts in grouped.items():
        names = set(parts) - {"alpha"}
        if names & set(TUCKER_FACTORS):
            raise LycorisError(
                f"{stem}: Tucker-decomposed LyCORIS convolutions (use_tucker) are not supported"
            )
        if names <= set(LOKR_FACTORS):
            kind = "LoKr"
        elif names <= set(LOHA_FACTORS):
            kind = "LoHa"
        else:
            raise LycorisError(f"{stem}: unexpected tensors {sorted(names)[:4]} in a LyCORIS file")
        if not _complete(kind, names):
            raise LycorisError(f"{stem}: incomplete {kind} factors {sorted(names)}")
        alpha = parts.get("alpha")
        modules[stem] = LycorisModule(
            stem,
            kind,
            {name: parts[name] for name in names},
            float(alpha.reshape(-1)[0]) if alpha is not None else None,
        )
    return modules


def _complete(kind: str, names: set[str]) -> bool:
    if kind == "LoHa":
        return names == set(LOHA_FACTORS)
    return all(
        (f"lokr_w{i}" in names) != ({f"lokr_w{i}_a", f"lokr_w{i}_b"} <= names) for i in (1, 2)
    )


def probe_modules(modules: dict[str, LycorisModule]) -> dict[str, ProbeModule]:
    """Each module as the LoRA of the same name and shape that `key_probe` converts: kohya's
    key names for kohya-style stems, peft's otherwise."""
    probes = {}
    for stem, module in modules.items():
        rows, columns = module.shape
        if stem.startswith((*KOHYA_PREFIXES, ONETRAINER_PREFIX)):
            keys = (f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha")
        else:
            keys = (f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", None)
        probes[stem] = ProbeModule(*keys, rows, columns)
    return probes


@dataclass
class LycorisAdapter:
    """A loaded LoKr / LoHa adapter: its modules and, per module, the base layers it changes."""

    kind: str
    modules: dict[str, LycorisModule]
    targets: dict[str, list[tuple[str, torch.nn.Module, Target]]]
    """stem -> (path, the base layer, its part of the delta)."""

    @property
    def layer_count(self) -> int:
        return sum(len(parts) for parts in self.targets.values())

    def deltas(self):
        """(path, base layer, its delta at strength 1 in the layer's shape, dtype and device),
        one module's delta made at a time."""
        for stem, parts in self.targets.items():
            delta = self.modules[stem].delta()
            for path, layer, target in parts:
                part = delta.index_select(0, target.rows).index_select(1, target.columns)
                weight = layer.weight
                yield path, layer, part.reshape(weight.shape).to(weight.device, weight.dtype)
