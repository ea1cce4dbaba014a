"""Free slots: the layers of evicted adapters, kept to be refilled by the next adapter of the
same layout.

Building an adapter's peft layers (diffusers' `inject_adapter_in_model`) costs far more than
reading its file, so an evicted adapter's layers are kept, inactive, and the next adapter whose
converted keys and shapes (its signature) match them exactly is copied into them in place. A
file of a layout seen before is copied from its bytes (`byte_layouts.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft.tuners.lora.layer import LoraLayer

from deployments import byte_layouts
from deployments.byte_layouts import ByteLayout

# The layout of one adapter's layers: (`<component>.<module>.lora_{A,B}.weight`, shape) pairs.
Signature = frozenset[tuple[str, tuple[int, ...]]]
MAX_SIGNATURES = 256  # distinct signatures interned before the pool starts over


class FreeSlots:
    """The free slots of one pipeline, oldest first. Reads the adapters' layers from the dict
    its owner keeps current; every call but `count` belongs on the tensor thread."""

    def __init__(
        self, layers: dict[str, dict[str, LoraLayer]], loaded_names: Callable[[], set[str]]
    ):
        self._layers = layers
        self._loaded_names = loaded_names
        # Evicted adapters whose layers are kept for reuse: name -> signature, oldest first.
        self._free: dict[str, Signature] = {}
        self._signatures: dict[str, Signature | None] = {}  # fixed when the layers are built
        # Free-slot matrices by converted key, and the slots laid out as a file's data:
        # slot -> (the layout, the flat buffer its matrices view).
        self._slot_parameters: dict[str, dict[str, torch.nn.Parameter]] = {}
        self._packed: dict[str, tuple[ByteLayout, torch.Tensor]] = {}
        self._signature_pool: dict[Signature, Signature] = {}

    def names(self) -> list[str]:
        return list(self._free)

    def count(self) -> int:
        """Free slots now; safe to read beside the tensor thread, unlike `names`."""
        return len(self._free)

    def keep(self, adapter_name: str) -> bool:
        """Make an evicted adapter's layers a free slot, if they can be refilled exactly
        (plain LoRA layers at alpha = rank); False when they cannot."""
        if adapter_name not in self._signatures:
            found = self.signature_of(adapter_name)
            self._signatures[adapter_name] = found and self.interned(found)
        signature = self._signatures[adapter_name]
        if signature is None:
            return False
        self._free[adapter_name] = signature
        return True

    def forget(self, adapter_name: str) -> None:
        """The adapter's layers are deleted, or built anew under its name."""
        self._free.pop(adapter_name, None)
        self._signatures.pop(adapter_name, None)
        self._slot_parameters.pop(adapter_name, None)
        self._packed.pop(adapter_name, None)

    def slot_for(self, signature: Signature) -> str | None:
        signature = self.interned(signature)
        for slot, slot_signature in self._free.items():
            if slot_signature is signature or slot_signature == signature:
                return slot
        return None

    def interned(self, signature: Signature) -> Signature:
        """One object per distinct signature, so slots match by identity: comparing two equal
        sets of a few hundred entries costs a cold load more than its copy."""
        if len(self._signature_pool) > MAX_SIGNATURES:
            self._signature_pool.clear()  # slots then match by equality, as without the pool
        return self._signature_pool.setdefault(signature, signature)

    def signature_of(self, adapter_name: str) -> Signature | None:
        """The adapter's layer layout, or None when its layers are more than plain LoRA
        matrices at alpha = rank (DoRA, bias, rsLoRA, embeddings, merged or scaled alphas)."""
        layers = self._layers.get(adapter_name)
        if not layers or adapter_name not in self._loaded_names():
            return None
        entries = []
        for path, module in layers.items():
            if (
                not isinstance(module, LoraLayer)
                or adapter_name not in module.lora_A
                or adapter_name in getattr(module, "lora_embedding_A", {})
                or adapter_name in module.lora_variant
                or module.lora_bias.get(adapter_name)
                or module.use_rslora.get(adapter_name)
                or module.lora_alpha[adapter_name] != module.r[adapter_name]
                or adapter_name in module.merged_adapters
                or not isinstance(module.lora_dropout[adapter_name], torch.nn.Identity)
            ):
                return None
            for kind in ("A", "B"):
                weight = getattr(module, f"lora_{kind}")[adapter_name].weight
                entries.append((f"{path}.lora_{kind}.weight", tuple(weight.shape)))
        return frozenset(entries)

    def fill(self, slot: str, converted: dict[str, torch.Tensor]) -> None:
        """Copy a file's matrices into a free slot's layers, which the signature match says
        are exactly the modules and shapes a fresh load would build. Past the library here:
        diffusers and peft only build new layers (`inject_adapter_in_model`, the cost this
        avoids); the copy is what peft's `set_peft_model_state_dict` does once they exist
        (`load_state_dict`: `copy_` into each parameter, cast to its dtype and device)."""
        parameters = self._parameters_of(slot)
        with torch.no_grad():
            for key, tensor in converted.items():
                parameters[key].copy_(tensor)
        self._refilled(slot)

    def fill_from_bytes(self, slot: str, layout: ByteLayout, data: bytes) -> None:
        """Copy a file of a known layout into a free slot of its signature, from its bytes: one
        copy when the slot is laid out as that layout's data, else laid out so first."""
        parameters = self._parameters_of(slot)
        packed = self._packed.get(slot)
        if packed is not None and packed[0] is layout and _views_of(packed[1], layout, parameters):
            packed[1].copy_(byte_layouts.data_of(layout, data))
        else:
            self._packed.pop(slot, None)
            flat = byte_layouts.pack(layout, data, parameters)
            if flat is None:
                byte_layouts.copy_each(layout, data, parameters)
            else:
                self._packed[slot] = (layout, flat)
        self._refilled(slot)

    def _refilled(self, slot: str) -> None:
        for module in self._layers[slot].values():
            # As a fresh load leaves it before activation: alpha / rank, which is 1.
            module.scaling[slot] = module.lora_alpha[slot] / module.r[slot]
        del self._free[slot]

    def _parameters_of(self, slot: str) -> dict[str, torch.nn.Parameter]:
        """The slot's LoRA matrices by converted key (`<path>.lora_{A,B}.weight`)."""
        if slot not in self._slot_parameters:
            self._slot_parameters[slot] = {
                f"{path}.lora_{kind}.weight": getattr(module, f"lora_{kind}")[slot].weight
                for path, module in self._layers[slot].items()
                for kind in ("A", "B")
            }
        return self._slot_parameters[slot]


def slot_layout_of(converted: dict, network_alphas: dict) -> dict | None:
    """The converted file as a free slot takes it, when a fresh load would give plain LoRA
    layers at scale 1: no network alphas (kohya's `.alpha`, which diffusers turns into
    per-module scales), no DoRA, no bias, one rank per component; else None (loaded freshly)."""
    if network_alphas:
        return None
    ranks: dict[str, set[int]] = {}
    for key, tensor in converted.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")) or tensor.ndim < 2:
            return None
        if key.endswith(".lora_A.weight"):
            ranks.setdefault(key.partition(".")[0], set()).add(int(tensor.shape[0]))
    # diffusers' alpha for a file without alphas is the most common rank (peft_utils'
    # get_peft_kwargs); one rank per component keeps every module's scale at exactly 1.
    if not converted or any(len(found) != 1 for found in ranks.values()):
        return None
    return converted


def _views_of(flat: torch.Tensor, layout: ByteLayout, parameters: dict) -> bool:
    """Whether the parameters still view their places in `flat`. Only a move of the whole
    model (`.to()`) re-points them, so the first and last matrix tell."""
    start = flat.data_ptr()
    ends = (layout.matrices[0], layout.matrices[-1])
    return all(parameters[matrix.key].data_ptr() == start + matrix.begin for matrix in ends)


def signature_of_converted(converted: dict[str, torch.Tensor]) -> Signature:
    return frozenset((key, tuple(tensor.shape)) for key, tensor in converted.items())
