"""Shared pieces of the trainer-layout corpus (tests/trainer_layouts.py): the Layout record and
writers for the tensor kinds trainers save (LoRA pairs, LyCORIS LoKr and LoHa factors, DoRA
magnitudes), each reading its shapes from the pipeline it is given.

A `Target` is one adapted module as a file names it, plus the pipeline modules it covers: more
than one where the original model fuses them (Flux's `img_attn.qkv` is diffusers' to_q, to_k and
to_v), so the fused matrix's rows are the parts' output features in order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

RANK = 4
# Not the rank, so a loader that drops or double-applies alpha changes the result.
ALPHA = 2.0
# Small values keep the deltas of the real-size layers small, as trained ones are.
SCALE = 0.02

Build = Callable[[Any], tuple[dict[str, torch.Tensor], dict[str, str]]]


@dataclass(frozen=True)
class Layout:
    family: str
    name: str
    trainer: str
    kind: str  # "LoRA", "DoRA", "LoKr", "LoHa", "Control"
    expect: str  # "loads" or "refused"
    reason: str | None
    build: Build

    def __str__(self) -> str:
        return f"{self.family}/{self.name}"


@dataclass(frozen=True)
class Target:
    key: str
    """The module's name in the file, before `.lora_down.weight` and the like."""
    parts: tuple[str, ...]
    """Pipeline module paths (`<component>.<module path>`) it covers, in row order."""
    in_features: int | None = None
    """Overrides the first part's input width (a control LoRA's widened `x_embedder`)."""


def module_at(pipe, path: str) -> torch.nn.Module:
    """The pipeline module at `<component>.<module path>` (a peft wrapper's base layer)."""
    attr, _, rest = path.partition(".")
    module = getattr(pipe, attr).get_submodule(rest)
    return getattr(module, "base_layer", module)


def shape_of(pipe, target: Target) -> tuple[int, int, tuple[int, ...]]:
    """(in features, summed out features, conv kernel or ()) of a target's modules."""
    modules = [module_at(pipe, part) for part in target.parts]
    first = modules[0]
    if isinstance(first, torch.nn.Conv2d):
        outs = sum(m.out_channels for m in modules)
        return target.in_features or first.in_channels, outs, tuple(first.kernel_size)
    return target.in_features or first.in_features, sum(m.out_features for m in modules), ()


def linear_paths(pipe, component: str, keep: Callable[[str], bool]) -> list[str]:
    """`<component>.<path>` of the component's Linear layers whose path `keep` accepts."""
    model = getattr(pipe, component)
    return [
        f"{component}.{name}"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and keep(name)
    ]


def suffix_match(suffixes: Iterable[str]) -> Callable[[str], bool]:
    """peft's `target_modules` rule: the module path is a suffix, or ends with `.suffix`."""
    suffixes = tuple(suffixes)
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def same_name(paths: Iterable[str], rename: Callable[[str], str]) -> list[Target]:
    """One unfused target per pipeline path, named in the file by `rename(path)`."""
    return [Target(rename(path), (path,)) for path in paths]


def kohya(prefix: str, path: str) -> str:
    """kohya's module name: the prefix and the module path with `_` for `.`."""
    return prefix + path.replace(".", "_")


CLIP_ENDINGS = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2")


def clip_path(attr: str, path: str) -> str:
    """A CLIP text encoder's module path as trainers built on transformers 4 name it: under
    `text_model.`, which transformers 5's CLIPTextModel no longer has (`text_projection`
    stays at the top)."""
    inner = path.removeprefix(attr + ".")
    if inner.startswith(("text_model.", "text_projection")):
        return inner
    return "text_model." + inner


def clip_targets(
    pipe, attr: str, rename: Callable[[str], str], endings: tuple[str, ...] | None = CLIP_ENDINGS
) -> list[Target]:
    """The CLIP encoder's Linear layers ending in `endings` (all of them for None), each named
    `rename(its transformers-4 path)` in the file."""
    keep = suffix_match(endings) if endings else (lambda name: True)
    paths = linear_paths(pipe, attr, keep)
    return same_name(paths, lambda path: rename(clip_path(attr, path)))


class Writer:
    """Seeded random tensors of one file, in the dtype its trainer saves."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.tensors: dict[str, torch.Tensor] = {}

    def rand(self, key: str, *shape: int) -> None:
        values = torch.randn(*shape, generator=self.generator) * SCALE
        self.tensors[key] = values.to(self.dtype)

    def scalar(self, key: str, value: float, shape: tuple[int, ...] = ()) -> None:
        self.tensors[key] = torch.tensor(value, dtype=self.dtype).reshape(shape)


DOWN_UP = (".lora_down.weight", ".lora_up.weight")
A_B = (".lora_A.weight", ".lora_B.weight")


def lora(
    pipe,
    targets: Iterable[Target],
    writer: Writer,
    names: tuple[str, str] = DOWN_UP,
    alpha: float | None = ALPHA,
    bias: bool = False,
    rank: int = RANK,
) -> dict[str, torch.Tensor]:
    """A low-rank pair per target (kohya's 3x3 convs: a 3x3 down and a 1x1 up), `.alpha`
    unless alpha is None, and a `lora_B.bias` (peft's lora_bias) when asked."""
    down, up = names
    for target in targets:
        in_features, out_features, kernel = shape_of(pipe, target)
        writer.rand(target.key + down, rank, in_features, *kernel)
        writer.rand(target.key + up, out_features, rank, *((1, 1) if kernel else ()))
        if bias:
            writer.rand(target.key + up.replace(".weight", ".bias"), out_features)
        if alpha is not None:
            writer.scalar(target.key + ".alpha", alpha)
    return writer.tensors


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of a width into (m, n), m <= n, m * n = dimension: the pair nearest
    the square root, with m at most `factor` when it is positive (the factor itself when it
    divides the width), as its `factorization(dim, factor)` documents."""
    if factor > 0 and dimension % factor == 0:
        small, large = sorted((factor, dimension // factor))
        return small, large
    best = 1
    for m in range(1, math.isqrt(dimension) + 1):
        if dimension % m == 0 and (factor <= 0 or m <= factor):
            best = m
    return best, dimension // best


def lokr(
    pipe, targets: Iterable[Target], writer: Writer, factor: int = -1, alpha: float = ALPHA
) -> dict[str, torch.Tensor]:
    """LyCORIS LoKr (lycoris/modules/lokr.py, Linear): ΔW = kron(w1, w2) * alpha / rank, with
    out = a*b and in = c*d factored, w1 (a, c) full and w2 (b, d) as w2_a (b, r) @ w2_b (r, d)
    while the rank is under half of max(b, d) (a full w2 otherwise, scale 1)."""
    for target in targets:
        in_features, out_features, _ = shape_of(pipe, target)
        out_l, out_k = factorization(out_features, factor)
        in_m, in_n = factorization(in_features, factor)
        writer.rand(target.key + ".lokr_w1", out_l, in_m)
        if RANK < max(out_k, in_n) / 2:
            writer.rand(target.key + ".lokr_w2_a", out_k, RANK)
            writer.rand(target.key + ".lokr_w2_b", RANK, in_n)
        else:
            writer.rand(target.key + ".lokr_w2", out_k, in_n)
        writer.scalar(target.key + ".alpha", alpha)
    return writer.tensors


def loha(
    pipe, targets: Iterable[Target], writer: Writer, alpha: float = ALPHA
) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa (lycoris/modules/loha.py, Linear): ΔW = (w1_a @ w1_b) * (w2_a @ w2_b) *
    alpha / rank, with w*_a (out, r) and w*_b (r, in)."""
    for target in targets:
        in_features, out_features, _ = shape_of(pipe, target)
        for pair in ("1", "2"):
            writer.rand(f"{target.key}.hada_w{pair}_a", out_features, RANK)
            writer.rand(f"{target.key}.hada_w{pair}_b", RANK, in_features)
        writer.scalar(target.key + ".alpha", alpha)
    return writer.tensors


def ai_toolkit_metadata(name: str) -> dict[str, str]:
    """What ai-toolkit's get_meta_for_safetensors (toolkit/metadata.py) adds to every file:
    its `software` record as a JSON string, and `format: pt`."""
    software = {"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit"}
    return {"name": name, "version": "1.0", "software": json.dumps(software), "format": "pt"}


def kohya_metadata(module: str, base: str, args: dict | None = None) -> dict[str, str]:
    """The sd-scripts / musubi-tuner `ss_*` training metadata a loader may read."""
    metadata = {
        "ss_network_module": module,
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(ALPHA),
        "ss_base_model_version": base,
    }
    if args:
        metadata["ss_network_args"] = json.dumps(args)
    return metadata


def diffusers_metadata(component: str, targets: list[str], alpha: float) -> dict[str, str]:
    """diffusers' `lora_adapter_metadata` (lora_base.py `_save_lora_weights`): the component's
    peft LoraConfig fields, prefixed with the component, as sorted JSON."""
    config = {"r": RANK, "lora_alpha": alpha, "target_modules": sorted(targets)}
    flat = {f"{component}.{key}": value for key, value in config.items()}
    return {"lora_adapter_metadata": json.dumps(flat, indent=2, sort_keys=True)}
