"""Block groups of a denoiser, for per-block LoRA strengths (`block_weights`).

A family names its denoiser's block groups (Flux: `transformer_blocks`, then
`single_transformer_blocks`); each group is an ordered list of blocks, and each block is the
module-name prefixes it covers. A request scales an adapter per group with one number, or per
block with one weight per block of the group. LoRA layers outside every block keep the plain
strength.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deployments.errors import InvalidRequest

Block = tuple[str, ...]
"""The module-name prefixes (relative to the denoiser) that one block covers."""
BlockScales = tuple[tuple[str, tuple[float, ...]], ...]
"""Per weighted group, one weight per block: the hashable form an active stack is keyed by."""


@dataclass(frozen=True)
class BlockGroups:
    names: tuple[str, ...]
    """Group names in model order, as requests spell them."""
    blocks: Callable[[Any], dict[str, list[Block]]]
    """The loaded denoiser -> per group, its blocks in order."""


def numbered_blocks(*names: str) -> BlockGroups:
    """Groups that are ModuleLists of the denoiser (a transformer's block lists): block i of
    group `name` is the module `name.i`."""

    def blocks(denoiser) -> dict[str, list[Block]]:
        return {
            name: [(f"{name}.{i}",) for i in range(len(getattr(denoiser, name)))] for name in names
        }

    return BlockGroups(names=names, blocks=blocks)


def check_group_names(groups: BlockGroups | None, weights: Mapping, field: str, family: str):
    """InvalidRequest naming `field` when a group is not one of the family's."""
    known = groups.names if groups is not None else ()
    for name in weights:
        if name not in known:
            expected = ", ".join(known) or "none (this family has no block groups)"
            raise InvalidRequest(
                f"{field}: unknown block group {name!r} for {family}; expected {expected}"
            )


class BlockLayout:
    """One loaded denoiser's blocks: validates requested weights and finds a layer's block."""

    def __init__(self, groups: BlockGroups | None, denoiser, family: str):
        self.groups = groups
        self.family = family
        self.blocks = groups.blocks(denoiser) if groups is not None else {}
        self._block_of_prefix = {
            prefix: (group, index)
            for group, blocks in self.blocks.items()
            for index, block in enumerate(blocks)
            for prefix in block
        }

    def scales(self, weights: Mapping[str, float | Sequence[float]], field: str) -> BlockScales:
        """The weights as one number per block of each named group; InvalidRequest naming
        `field` for an unknown group or a list whose length is not the group's block count."""
        check_group_names(self.groups, weights, field, self.family)
        scales = []
        for group in sorted(weights):
            weight = weights[group]
            count = len(self.blocks[group])
            if isinstance(weight, int | float):
                scales.append((group, (float(weight),) * count))
                continue
            if len(weight) != count:
                raise InvalidRequest(
                    f"{field}.{group}: {len(weight)} weights given, but this model's {group} "
                    f"has {count} blocks (give {count} weights, or one number for the group)"
                )
            scales.append((group, tuple(float(w) for w in weight)))
        return tuple(scales)

    def block_of(self, module_name: str) -> tuple[str, int] | None:
        """(group, block index) of a denoiser module, or None outside every block."""
        parts = module_name.split(".")
        for end in range(len(parts), 0, -1):
            found = self._block_of_prefix.get(".".join(parts[:end]))
            if found is not None:
                return found
        return None
