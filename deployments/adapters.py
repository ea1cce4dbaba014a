"""LoRA adapters inside one loaded pipeline: check, load, activate per request, release, delete.

`PipelineAdapters` is the facade a replica uses; each concern lives in its own module:
- `lora_check.py`: whether a file fits the model, before anything touches the pipeline;
- `adapter_slots.py` and `byte_layouts.py`: cold loads into the layers of evicted adapters,
  from a file's bytes where its layout was seen before (`prepare` / `load_prepared`);
- `adapter_activation.py`: the request's stack made active, fused where it pays;
- `lycoris.py`: LoKr / LoHa adapters, whose deltas go into the base weights while active;
- `base_guard.py`: the base model as loaded, put back if a load changed it.

diffusers loads and converts files (`load_lora_weights`) and keeps each adapter as peft layers
beside the base weights, so switching adapters is a scale change, never a reload. It can load a
file that matches no module and change nothing: each load counts the layers the adapter really
got and refuses zero.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import threading
from dataclasses import dataclass

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from deployments import byte_layouts, lycoris
from deployments.adapter_activation import ActiveAdapter, AdapterActivation
from deployments.adapter_slots import (
    FreeSlots,
    signature_of_converted,
    slot_layout_of,
)
from deployments.base_guard import BaseGuard
from deployments.blocks import BlockLayout, BlockScales
from deployments.byte_layouts import ByteLayout
from deployments.errors import LoraIncompatible
from deployments.family import Family
from deployments.lora_anatomy import FileAnatomy
from deployments.lora_check import MAX_KEY_EXAMPLES, LoraChecker
from deployments.loras.files import header_metadata, parse_lora_file, read_header
from deployments.loras.formats import apply_metadata_alpha
from deployments.loras.metadata import LORA_ADAPTER_METADATA_KEY, lora_metadata
from deployments.loras.tensors import check_values

MAX_BYTE_LAYOUTS = 256  # file layouts remembered per pipeline (`prepare`), least recent dropped
# Headers up to this size are also remembered whole, as the fastest key; longer ones (kohya's
# metadata can be large) only by their tensor entries, so the keys stay small.
MAX_RAW_KEY_BYTES = 256 * 1024
SLOT_NAME_PREFIX = "lx_slot"  # adapters loaded through `load_reusing`


@dataclass
class PreparedAdapter:
    """A LoRA file read and checked against one pipeline (`PipelineAdapters.prepare`), ready for
    `load_prepared`. A file of a layout seen before carries only its bytes and that layout."""

    label: str
    data: bytes
    layout: ByteLayout | None = None
    """Where its matrices lie in `data`, when its conversion only renames keys."""
    tensors: dict[str, torch.Tensor] | None = None
    """The file's tensors, metadata alpha folded in; None until needed on the layout path."""
    converted: dict[str, torch.Tensor] | None = None
    """Its matrices as a free slot takes them (`_slot_layout`), when `tensors` is set."""


def adapter_name_for(key: str) -> str:
    """A peft-safe adapter name for a store key (peft names may not contain dots)."""
    return "lx_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class PipelineAdapters:
    """The adapters loaded into one pipeline. Not thread-safe: the replica serializes calls."""

    def __init__(
        self, pipe, family: Family, fuse_single: bool = False, max_adapters: int | None = None
    ):
        self.pipe = pipe
        self.family = family
        # Bound on adapters holding layers (hot and free slots together); None: no free slots.
        self.max_adapters = max_adapters
        # Each loaded adapter's layers, `<component>.<module>` -> layer, found once at load
        # (a walk over every module of a large model costs as much as a copy into them).
        self._layers: dict[str, dict[str, LoraLayer]] = {}
        self.checker = LoraChecker(pipe, family)
        # The base model as loaded: each fresh load is compared with it (`load`).
        self.guard = BaseGuard(pipe, family.lora_components)
        # Why the pipeline can no longer serve (a load changed it beyond repair), or None.
        self.broken: str | None = None
        # LoKr / LoHa adapters: their factors, applied into the base weights while active.
        self._lycoris: dict[str, lycoris.LycorisAdapter] = {}
        # Every call that changes layers belongs on the thread that built this object (the
        # replica's tensor thread); calls from any other are counted, and /models shows them.
        self._tensor_thread = threading.get_ident()
        self.calls_off_thread = 0
        self._slots_made = 0
        # Loads that built new layers (diffusers' `load_lora_weights`): no free slot fit. Every
        # other load refilled a slot, at a small part of the cost.
        self.fresh_loads = 0
        # File layouts seen, by raw header bytes and by header entries (`byte_layouts`). Kept
        # over fresh loads, which never reshape a base layer (`load` undoes any that does).
        self._known_layouts = byte_layouts.KnownLayouts(MAX_BYTE_LAYOUTS)
        self.slots = FreeSlots(self._layers, self._loaded_names)
        denoiser = getattr(pipe, family.denoiser_component)
        self.blocks = BlockLayout(family.block_groups, denoiser, family.name)
        self.activation = AdapterActivation(
            pipe, family, self.blocks, self._layers, self._lycoris, self._find_layers, fuse_single
        )

    @property
    def fuse_single(self) -> bool:
        """Whether a request of one plain LoRA fuses it into the denoiser's weights."""
        return self.activation.fuse_single

    @fuse_single.setter
    def fuse_single(self, fuse: bool) -> None:
        self.activation.fuse_single = fuse

    def _count_thread(self) -> None:
        if threading.get_ident() != self._tensor_thread:
            self.calls_off_thread += 1

    def block_scales(self, block_weights: dict, field: str) -> BlockScales:
        """A request's `block_weights` as one weight per block of this model; InvalidRequest
        naming `field` for an unknown group or a list of the wrong length."""
        return self.blocks.scales(block_weights, field)

    def check(self, tensors: dict[str, torch.Tensor], label: str) -> int:
        """Count the file's LoRA matrices (LyCORIS: module parts) that land on a module of
        this model, without touching the pipeline; LoraIncompatible naming what does not fit
        (`lora_check.py`). Safe to call beside a generation."""
        return self.checker.check(tensors, label).matched

    def load(self, adapter_name: str, tensors: dict[str, torch.Tensor], label: str) -> int:
        """Inject an adapter; returns its layer count. On any failure the pipeline is unchanged:
        a load that changed a base layer anyway is undone and refused (`base_guard.py`)."""
        self._count_thread()
        self.activation.reset()  # diffusers activates what it loads; the next request re-activates
        self.slots.forget(adapter_name)
        if FileAnatomy.of(tensors).kind in ("LoKr", "LoHa"):
            return self._load_lycoris(adapter_name, tensors, label)
        try:
            renamed = self.checker.converter.renamed(dict(tensors))
            self.pipe.load_lora_weights(renamed, adapter_name=adapter_name)
        except Exception as e:
            self.delete(adapter_name)
            self._refuse_if_base_changed(label)
            # A converter's bare assert has no message: its type then says what failed.
            why = str(e) or f"{type(e).__name__} in diffusers' LoRA conversion"
            raise LoraIncompatible(f"Failed to load LoRA: {label}: {why}") from e
        self._refuse_if_base_changed(label, adapter_name)
        self._layers[adapter_name] = self._find_layers(adapter_name)
        layers = len(self._layers[adapter_name])
        if layers == 0:
            self.delete(adapter_name)
            examples = ", ".join(list(tensors)[:MAX_KEY_EXAMPLES])
            raise LoraIncompatible(
                f"Failed to load LoRA: {label}: no key matched the {self.family.name} model "
                f"(0 of {len(tensors)} tensors matched; e.g. {examples})"
            )
        return layers

    def _refuse_if_base_changed(self, label: str, adapter_name: str | None = None) -> None:
        """After a fresh load: if a base layer, parameter or config value changed, delete the
        adapter, put the base model back and refuse the file. What cannot be put back marks
        the pipeline broken (`broken`), which the replica's health check reports."""
        changes = self.guard.changes()
        if not changes:
            return
        if adapter_name is not None:
            self.delete(adapter_name)
        unrestored = self.guard.restore()
        self.checker.forget_shapes()
        more = f" and {len(changes) - 1} more" if len(changes) > 1 else ""
        outcome = "the change was undone and the file refused"
        if unrestored:
            self.broken = f"a load of {label} changed the base model: {unrestored[0]}"
            outcome = "the file is refused and this replica will be replaced"
        raise LoraIncompatible(
            f"Failed to load LoRA: {label}: loading it changed the base model "
            f"({changes[0]}{more}); {outcome}"
        )

    def _load_lycoris(self, adapter_name: str, tensors: dict[str, torch.Tensor], label: str):
        """A LoKr / LoHa file: its factors kept beside the model, applied by `_fuse_lycoris`."""
        checked = self.checker.check(tensors, label)
        modules = lycoris.modules_of(self.checker.converter.renamed(dict(tensors)))
        device = self._device()
        modules = {
            stem: dataclasses.replace(
                module, factors={k: v.to(device) for k, v in module.factors.items()}
            )
            for stem, module in modules.items()
        }
        targets = {
            stem: [(t.path, self._base_layer(t.path), t) for t in found]
            for stem, found in checked.lycoris.items()
        }
        adapter = lycoris.LycorisAdapter(checked.anatomy.kind, modules, targets)
        self._lycoris[adapter_name] = adapter
        return adapter.layer_count

    def _base_layer(self, path: str) -> torch.nn.Module:
        attr, _, module_path = path.partition(".")
        module = getattr(self.pipe, attr).get_submodule(module_path)
        return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module

    def _device(self) -> torch.device:
        return getattr(self.pipe, self.family.denoiser_component).device

    def delete(self, adapter_name: str) -> None:
        """Remove an adapter's layers from every component and free their memory."""
        self._count_thread()
        self.activation.reset()
        self.slots.forget(adapter_name)
        self._lycoris.pop(adapter_name, None)
        self._layers.pop(adapter_name, None)
        if adapter_name in self._loaded_names():
            self.pipe.delete_adapters([adapter_name])
        self.activation.drop_unused_buffers()
        if torch.cuda.is_available():
            # On the device, free the layers now, cycles included. Not on a CPU, where reference
            # counting frees them and a full collection of a large heap cost more than the load
            # itself (bench.py: 500 swaps, resident memory flat without it).
            gc.collect()
            torch.cuda.empty_cache()

    def prepare(self, data: bytes, label: str) -> PreparedAdapter:
        """Read a `.safetensors` LoRA and check it against this model (`check`), without
        touching the pipeline; LoraIncompatible for a file that cannot load. A file whose
        layout was seen before (same header entries and adapter metadata) is neither parsed
        nor converted again: its bytes load straight into a free slot (`byte_layouts`), once
        their values are checked. Safe to call beside a generation."""
        header_len = byte_layouts.header_length(data) if len(data) >= 8 else 0
        raw_key = bytes(data[8 : 8 + header_len]) if 0 < header_len <= MAX_RAW_KEY_BYTES else None
        layout = self._known_layouts.get(raw_key, data)
        if layout is None:
            header = read_header(data, label)
            metadata = header_metadata(header)
            lora_metadata(metadata, label)  # a layout hit must not skip what a parse refuses
            try:
                configs = metadata.get(LORA_ADAPTER_METADATA_KEY)
                entries_key = byte_layouts.layout_key(header, header_len, configs)
            except (KeyError, TypeError, ValueError):
                entries_key = None  # a malformed entry: safetensors' parse names the fault
            layout = self._known_layouts.get(entries_key, data)
            if layout is None:
                return self._parse_and_check(data, label, header, raw_key, entries_key)
            self._known_layouts.remember(raw_key, layout)
        # The layout's file had sound values; these bytes are another file's (NaN, inf).
        check_values(byte_layouts.matrices_in(layout, data), label)
        return PreparedAdapter(label, data, layout=layout)

    def _parse_and_check(self, data, label, header, raw_key, entries_key) -> PreparedAdapter:
        parsed, metadata = parse_lora_file(data, label)
        tensors = apply_metadata_alpha(parsed, metadata, label)
        checked = self.checker.check(tensors, label)
        clones, converted = checked.clones, checked.converted
        slot_layout = layout = None
        if checked.lycoris is None:
            slot_layout = slot_layout_of(converted, checked.network_alphas)
        if slot_layout is not None and entries_key is not None:
            signature = self.slots.interned(signature_of_converted(slot_layout))
            layout = byte_layouts.derive(header, data, parsed, clones, slot_layout, signature)
            if layout is not None:
                self._known_layouts.remember(entries_key, layout)
                self._known_layouts.remember(raw_key, layout)
        return PreparedAdapter(label, data, layout, tensors, slot_layout)

    def load_prepared(self, prepared: PreparedAdapter) -> tuple[str, int]:
        """`load_reusing` for a prepared file: a file of a known layout is copied from its
        bytes into a free slot of that layout; any other loads as `load_reusing` loads it."""
        self._count_thread()
        layout = prepared.layout
        if layout is not None:
            slot = self.slots.slot_for(layout.signature)
            if slot is not None:
                self.slots.fill_from_bytes(slot, layout, prepared.data)
                return slot, len(self._layers[slot])
        if prepared.tensors is None:
            prepared.converted = self._slot_layout(self.file_tensors(prepared))
        return self._load_reusing(prepared.tensors, prepared.label, prepared.converted)

    def file_tensors(self, prepared: PreparedAdapter) -> dict[str, torch.Tensor]:
        """The prepared file's tensors, metadata alpha folded in (parsed here if not yet)."""
        if prepared.tensors is None:
            parsed, metadata = parse_lora_file(prepared.data, prepared.label)
            prepared.tensors = apply_metadata_alpha(parsed, metadata, prepared.label)
        return prepared.tensors

    def load_reusing(self, tensors: dict[str, torch.Tensor], label: str) -> tuple[str, int]:
        """Load an adapter into a free slot whose layers fit it exactly, else freshly under a
        new name; returns (adapter name, layer count). On any failure the pipeline is unchanged,
        free slots included. Fresh loads then delete the oldest free slots beyond
        `max_adapters`, so the layers held stay bounded."""
        return self._load_reusing(tensors, label, self._slot_layout(tensors))

    def _load_reusing(
        self, tensors: dict[str, torch.Tensor], label: str, converted: dict | None
    ) -> tuple[str, int]:
        if converted is not None:
            slot = self.slots.slot_for(signature_of_converted(converted))
            if slot is not None:
                self.slots.fill(slot, converted)
                return slot, len(self._layers[slot])
        loaded = self._loaded_names()
        adapter_name = ""
        while not adapter_name or adapter_name in loaded:
            self._slots_made += 1
            adapter_name = f"{SLOT_NAME_PREFIX}{self._slots_made}"
        layers = self.load(adapter_name, tensors, label)
        self.fresh_loads += 1
        # Deleted after the load, not before: a file that fails to load leaves the slots as
        # they were. The peak is one adapter's layers over the bound.
        free = self.slots.names()
        while free and self.max_adapters is not None:
            if len(self._loaded_names()) <= self.max_adapters:
                break
            self.delete(free.pop(0))
        return adapter_name, layers

    def release(self, adapter_name: str) -> None:
        """An evicted adapter: its layers become a free slot where they can be refilled
        exactly (plain LoRA layers, alpha = rank), else they are deleted. Free slots are never
        active, so they change no generation."""
        self._count_thread()
        self.activation.forget_if_using(adapter_name)
        if (
            self.max_adapters is None
            or adapter_name not in self._loaded_names()
            or not self.slots.keep(adapter_name)
        ):
            self.delete(adapter_name)
            return
        free = self.slots.names()
        while len(self._loaded_names()) > self.max_adapters and free:
            self.delete(free.pop(0))

    def free_slots(self) -> list[str]:
        return self.slots.names()

    def free_slot_count(self) -> int:
        """Free slots now; safe to read beside the tensor thread, unlike `free_slots`."""
        return self.slots.count()

    def _slot_layout(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The file as `<component>.<module>.lora_{A,B}.weight` tensors in the layout diffusers
        loads them (its own conversion, `lora_state_dict`, and the renaming `load_lora_weights`
        does), when a fresh load would give plain LoRA layers at scale 1: no network alphas
        (kohya's `.alpha`, which diffusers turns into per-module scales), no DoRA, no bias, one
        rank per component. None when in doubt: the caller then loads freshly."""
        try:
            converter = self.checker.converter
            copies = converter.renamed({key: tensor.clone() for key, tensor in tensors.items()})
            converted, network_alphas = converter.convert(copies)
        except Exception:
            return None  # the fresh load reports the error
        return slot_layout_of(converted, network_alphas)

    def _loaded_names(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

    def activate(self, adapters: list[ActiveAdapter]) -> None:
        """Make exactly these adapters active, at these strengths, in request order."""
        self._count_thread()
        self.activation.activate(adapters)

    def layer_count(self, adapter_name: str) -> int:
        """How many of the model's layers this adapter modifies, over all components."""
        if adapter_name in self._lycoris:
            return self._lycoris[adapter_name].layer_count
        return len(self._find_layers(adapter_name))

    def kind_of(self, adapter_name: str) -> str:
        """The adapter's kind: LoKr / LoHa (LyCORIS), DoRA (peft DoRA layers) or LoRA."""
        adapter = self._lycoris.get(adapter_name)
        if adapter is not None:
            return adapter.kind
        layers = self._layers.get(adapter_name) or self._find_layers(adapter_name)
        if any(
            adapter_name in getattr(layer, "lora_magnitude_vector", {}) for layer in layers.values()
        ):
            return "DoRA"
        return "LoRA"

    def _find_layers(self, adapter_name: str) -> dict[str, LoraLayer]:
        layers = {}
        for attr in self.family.lora_components:
            component = getattr(self.pipe, attr, None)
            if component is None:
                continue
            for name, module in component.named_modules():
                if isinstance(module, BaseTunerLayer) and adapter_name in getattr(
                    module, "lora_A", {}
                ):
                    layers[f"{attr}.{name}"] = module
        return layers
