"""LoRA adapters inside one loaded pipeline: load, verify, activate per request, delete.

diffusers does the loading and format conversion (`load_lora_weights`) and keeps each adapter as
peft layers beside the base weights, so switching adapters is a scale change, never a reload.
Two things diffusers does not do, and this module adds: it can load a file that matches no
module and change nothing (we count the layers each adapter really got and refuse zero), and
its pipeline-wide `set_adapters` fails on a component that holds none of the adapters (we
activate per component).

A replica's cold loads go through free slots (`load_reusing` / `release`): building an adapter's
peft layers (diffusers' `inject_adapter_in_model`) costs far more than reading its file, so an
evicted adapter's layers are kept, inactive, and the next adapter whose converted keys and
shapes match them exactly is copied into them in place. A file of a layout seen before is
neither parsed nor converted again: its bytes are copied into the slot (`prepare` /
`load_prepared`, `byte_layouts.py`). Switches between hot adapters set only the layers of the
two stacks (`_activate_layers`).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
from diffusers.models.modeling_utils import ModelMixin
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from deployments import byte_layouts, lycoris
from deployments.base_guard import BaseGuard
from deployments.blocks import BlockLayout, BlockScales
from deployments.byte_layouts import ByteLayout
from deployments.errors import LoraIncompatible
from deployments.family import Family
from deployments.lora_anatomy import FileAnatomy
from deployments.lora_check import MAX_KEY_EXAMPLES, LoraChecker
from deployments.loras.files import parse_lora_file, read_header
from deployments.loras.formats import adapter_configs, apply_metadata_alpha

MAX_BYTE_LAYOUTS = 256  # file layouts remembered per pipeline (`prepare`), least recent dropped
# Headers up to this size are also remembered whole, as the fastest key; longer ones (kohya's
# metadata can be large) only by their tensor entries, so the keys stay small.
MAX_RAW_KEY_BYTES = 256 * 1024
SLOT_NAME_PREFIX = "lx_slot"  # adapters loaded through `load_reusing`


@dataclass(frozen=True)
class ActiveAdapter:
    adapter_name: str
    strength: float
    clip_strength: float
    block_scales: BlockScales = ()
    """Denoiser weights per block (`PipelineAdapters.block_scales`); other blocks: 1."""


# The layout of one adapter's layers: (`<component>.<module>.lora_{A,B}.weight`, shape) pairs.
Signature = frozenset[tuple[str, tuple[int, ...]]]


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
        self.fuse_single = fuse_single
        # Bound on adapters holding layers (hot and free slots together); None: no free slots.
        self.max_adapters = max_adapters
        # Evicted adapters whose layers are kept for reuse: name -> signature, oldest first.
        self._free: dict[str, Signature] = {}
        # Each loaded adapter's layers, `<component>.<module>` -> layer, found once at load
        # (a walk over every module of a large model costs as much as a copy into them).
        self._layers: dict[str, dict[str, LoraLayer]] = {}
        self._signatures: dict[str, Signature | None] = {}  # fixed when the layers are built
        self.checker = LoraChecker(pipe, family)
        # The base model as loaded: each fresh load is compared with it (`load`).
        self.guard = BaseGuard(pipe, family.lora_components)
        # Why the pipeline can no longer serve (a load changed it beyond repair), or None.
        self.broken: str | None = None
        # LoKr / LoHa adapters: their factors, applied into the base weights while active.
        self._lycoris: dict[str, lycoris.LycorisAdapter] = {}
        self._lycoris_fused: list[tuple[torch.nn.Module, torch.Tensor]] = []  # (layer, kept)
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
        self._byte_layouts: OrderedDict[object, ByteLayout] = OrderedDict()
        self._byte_layouts_lock = threading.Lock()
        # Free-slot matrices by converted key, and the slots laid out as a file's data:
        # slot -> (the layout, the flat buffer its matrices view).
        self._slot_parameters: dict[str, dict[str, torch.nn.Parameter]] = {}
        self._packed: dict[str, tuple[ByteLayout, torch.Tensor]] = {}
        self._signature_pool: dict[Signature, Signature] = {}
        self._active: tuple[ActiveAdapter, ...] | None = None
        # Denoiser layers whose weights hold a fused adapter: (layer, base weight, adapter).
        self._fused: list[tuple[LoraLayer, torch.Tensor, str]] = []
        # Per denoiser layer, the tensor its fused weights are written into: one more copy of
        # the adapted weights, as a fused adapter needs anyway, kept from one fusion to the next.
        self._fusion_buffers: dict[LoraLayer, torch.Tensor] = {}
        denoiser = getattr(pipe, family.denoiser_component)
        self.blocks = BlockLayout(family.block_groups, denoiser, family.name)

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
        self._unfuse()
        self._active = None  # diffusers activates what it loads; the next request re-activates
        self._signatures.pop(adapter_name, None)
        if FileAnatomy.of(tensors).kind in ("LoKr", "LoHa"):
            return self._load_lycoris(adapter_name, tensors, label)
        try:
            renamed = self.checker.converter.renamed(dict(tensors))
            self.pipe.load_lora_weights(renamed, adapter_name=adapter_name)
        except Exception as e:
            self.delete(adapter_name)
            self._refuse_if_base_changed(label)
            raise LoraIncompatible(f"Failed to load LoRA: {label}: {_describe(e)}") from e
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
        self._unfuse()
        self._active = None
        self._free.pop(adapter_name, None)
        self._lycoris.pop(adapter_name, None)
        self._layers.pop(adapter_name, None)
        self._signatures.pop(adapter_name, None)
        self._slot_parameters.pop(adapter_name, None)
        self._packed.pop(adapter_name, None)
        if adapter_name in self._loaded_names():
            self.pipe.delete_adapters([adapter_name])
        # Layers left with no adapter are never fused again.
        self._fusion_buffers = {
            module: buffer for module, buffer in self._fusion_buffers.items() if module.lora_A
        }
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
        nor converted again: its bytes load straight into a free slot (`byte_layouts`). Safe to
        call beside a generation."""
        header_len = byte_layouts.header_length(data) if len(data) >= 8 else 0
        raw_key = bytes(data[8 : 8 + header_len]) if 0 < header_len <= MAX_RAW_KEY_BYTES else None
        layout = self._known_layout(raw_key, data)
        if layout is not None:
            return PreparedAdapter(label, data, layout=layout)
        header = read_header(data, label)
        metadata = header.get("__metadata__") or {}
        try:
            entries_key = byte_layouts.layout_key(
                header, header_len, adapter_configs(metadata if isinstance(metadata, dict) else {})
            )
        except (KeyError, TypeError, ValueError):
            entries_key = None  # a malformed entry: safetensors' parse below names the fault
        layout = self._known_layout(entries_key, data)
        if layout is not None:
            self._remember_layout(raw_key, layout)
            return PreparedAdapter(label, data, layout=layout)
        parsed, metadata = parse_lora_file(data, label)
        tensors = apply_metadata_alpha(parsed, metadata, label)
        checked = self.checker.check(tensors, label)
        clones, converted = checked.clones, checked.converted
        slot_layout = None
        if checked.lycoris is None:
            slot_layout = self._slot_layout_of(converted, checked.network_alphas)
        if slot_layout is not None and entries_key is not None:
            signature = self._interned(_signature_of(slot_layout))
            layout = byte_layouts.derive(header, data, parsed, clones, slot_layout, signature)
            if layout is not None:
                self._remember_layout(entries_key, layout)
                self._remember_layout(raw_key, layout)
        return PreparedAdapter(label, data, layout, tensors, slot_layout)

    def _known_layout(self, key, data: bytes) -> ByteLayout | None:
        if key is None:
            return None
        with self._byte_layouts_lock:  # requests prepare their files side by side
            layout = self._byte_layouts.get(key)
            if layout is None or not byte_layouts.fits_data(layout, data):
                return None
            self._byte_layouts.move_to_end(key)
            return layout

    def _remember_layout(self, key, layout: ByteLayout) -> None:
        if key is None:
            return
        with self._byte_layouts_lock:
            self._byte_layouts[key] = layout
            while len(self._byte_layouts) > MAX_BYTE_LAYOUTS:
                self._byte_layouts.popitem(last=False)

    def load_prepared(self, prepared: PreparedAdapter) -> tuple[str, int]:
        """`load_reusing` for a prepared file: a file of a known layout is copied from its
        bytes into a free slot of that layout; any other loads as `load_reusing` loads it."""
        self._count_thread()
        layout = prepared.layout
        if layout is not None:
            slot = self._free_slot_for(layout.signature)
            if slot is not None:
                self._fill_from_bytes(slot, layout, prepared.data)
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

    def _free_slot_for(self, signature: Signature) -> str | None:
        signature = self._interned(signature)
        for slot, slot_signature in self._free.items():
            if slot_signature is signature or slot_signature == signature:
                return slot
        return None

    def _interned(self, signature: Signature) -> Signature:
        """One object per distinct signature, so slots match by identity: comparing two equal
        sets of a few hundred entries costs a cold load more than its copy."""
        if len(self._signature_pool) > MAX_BYTE_LAYOUTS:
            self._signature_pool.clear()  # slots then match by equality, as without the pool
        return self._signature_pool.setdefault(signature, signature)

    def _load_reusing(
        self, tensors: dict[str, torch.Tensor], label: str, converted: dict | None
    ) -> tuple[str, int]:
        if converted is not None:
            slot = self._free_slot_for(_signature_of(converted))
            if slot is not None:
                self._fill(slot, converted)
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
        free = list(self._free)
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
        self._forget_if_active(adapter_name)
        if adapter_name not in self._signatures:
            found = self._slot_signature(adapter_name)
            self._signatures[adapter_name] = found and self._interned(found)
        signature = self._signatures[adapter_name]
        if (
            signature is None
            or adapter_name not in self._loaded_names()
            or self.max_adapters is None
        ):
            self.delete(adapter_name)
            return
        self._free[adapter_name] = signature
        free = list(self._free)
        while len(self._loaded_names()) > self.max_adapters and free:
            self.delete(free.pop(0))

    def free_slots(self) -> list[str]:
        return list(self._free)

    def free_slot_count(self) -> int:
        """Free slots now; safe to read beside the tensor thread, unlike `free_slots`."""
        return len(self._free)

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
        return self._slot_layout_of(converted, network_alphas)

    def _slot_layout_of(self, converted: dict, network_alphas: dict) -> dict | None:
        """`_slot_layout` of a conversion already made."""
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

    def _slot_signature(self, adapter_name: str) -> Signature | None:
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

    def _fill(self, slot: str, converted: dict[str, torch.Tensor]) -> None:
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

    def _fill_from_bytes(self, slot: str, layout: ByteLayout, data: bytes) -> None:
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

    def _forget_if_active(self, adapter_name: str) -> None:
        """Before an adapter's layers change hands: if the applied stack uses it, unfuse and
        forget the stack (the next request re-activates through the library). Any other stack
        stays applied, and fused: its layers are untouched."""
        if self._active is not None and any(a.adapter_name == adapter_name for a in self._active):
            self._unfuse()
            self._active = None

    def _loaded_names(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

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

    def activate(self, adapters: list[ActiveAdapter]) -> None:
        """Make exactly these adapters active, at these strengths, in request order."""
        self._count_thread()
        wanted = tuple(adapters)
        if wanted == self._active:
            return
        self._unfuse()
        # LoKr / LoHa adapters hold no peft layers: the library activates the LoRAs, and the
        # LyCORIS deltas are added into the base weights after.
        loras = tuple(a for a in wanted if a.adapter_name not in self._lycoris)
        applied = tuple(a for a in self._active or () if a.adapter_name not in self._lycoris)
        single = self.fuse_single and len(wanted) == 1 and len(loras) == 1
        fusing = loras[0].adapter_name if single else None
        if self._active is not None and all(
            a.adapter_name in self._layers for a in applied + loras
        ):
            self._activate_layers(applied, loras, fusing)
        else:
            self._activate_components(list(loras))
        self._active = wanted
        if fusing is not None:
            self._fuse(fusing)
        self._fuse_lycoris([a for a in wanted if a.adapter_name in self._lycoris])

    def _fuse_lycoris(self, adapters: list[ActiveAdapter]) -> None:
        """Add each active LoKr / LoHa adapter's delta, at its strength (text encoders: its
        clip strength; weighted blocks: times the block's weight), into the base weights it
        changes; `_unfuse` puts the kept weights back, bit for bit."""
        denoiser_prefix = f"{self.family.denoiser_component}."
        for adapter in adapters:
            weights = dict(adapter.block_scales)
            for path, layer, delta in self._lycoris[adapter.adapter_name].deltas():
                if path.startswith(denoiser_prefix):
                    strength = adapter.strength
                    found = self.blocks.block_of(path.removeprefix(denoiser_prefix))
                    if found is not None and found[0] in weights:
                        strength *= weights[found[0]][found[1]]
                else:
                    strength = adapter.clip_strength
                kept = layer.weight.data
                with torch.no_grad():
                    layer.weight.data = kept + delta * strength
                self._lycoris_fused.append((layer, kept))

    def _activate_components(self, adapters: list[ActiveAdapter]) -> None:
        """Activation through the library, component by component: every LoRA layer of the
        pipeline is set. Used after a fresh load or a delete, which change layers' states."""
        loaded = self.pipe.get_list_adapters()
        for attr in self.family.lora_components:
            component = getattr(self.pipe, attr, None)
            if component is None or not loaded.get(attr):
                continue
            is_text_encoder = attr in self.family.text_encoder_components
            here = [a for a in adapters if a.adapter_name in loaded[attr]]
            names = [a.adapter_name for a in here]
            weights = [a.clip_strength if is_text_encoder else a.strength for a in here]
            _activate_component(component, names, weights)
            if attr == self.family.denoiser_component:
                self._scale_blocks([a for a in here if a.block_scales])

    def _activate_layers(
        self,
        applied: tuple[ActiveAdapter, ...],
        wanted: tuple[ActiveAdapter, ...],
        fusing: str | None,
    ) -> None:
        """From one applied stack to another by setting only the layers either uses, with
        peft's per-layer calls. Past the library here: diffusers' `set_adapters` and
        `enable_lora` walk every module of the model on each call, which cost a CPU replica
        more than the fusion's matrix work. Each layer ends as `set_adapters` leaves it: the
        stack's names active, each at its strength. Layers outside both stacks hold none of
        their adapters, so what they list as active changes nothing.

        A layer about to be fused for `fusing` only gets its scale: a merged layer's forward
        is its base layer alone, whatever it lists as active, and peft's `set_adapter` walks
        every adapter the layer holds (a quarter of a switch on the bench model, profiled). It
        is set in full at the next switch, which touches the fused adapter's layers, or by
        the library once the stack is forgotten."""
        names = [a.adapter_name for a in wanted]
        touched: dict[str, LoraLayer] = {}
        for adapter in applied + wanted:
            touched.update(self._layers.get(adapter.adapter_name, {}))
        text_encoders = self.family.text_encoder_components
        for path, layer in touched.items():
            if names and layer.disable_adapters:
                layer.enable_adapters(True)
            if fusing is None or not self._fusable(path, layer, fusing):
                layer.set_adapter(names, inference_mode=True)
            is_text_encoder = path.partition(".")[0] in text_encoders
            for adapter in wanted:
                strength = adapter.clip_strength if is_text_encoder else adapter.strength
                layer.set_scale(adapter.adapter_name, strength)
        self._scale_blocks([a for a in wanted if a.block_scales])

    def _fuse(self, adapter_name: str) -> None:
        """Add one active adapter's delta (at the scales just set) into the denoiser's weights,
        so its layers run as plain matmuls; the base weights are kept aside and put back as
        they were, bit for bit, by `_unfuse` (peft's unmerge subtracts, which is not exact)."""
        for path, module in self._layers.get(adapter_name, {}).items():
            if not self._fusable(path, module, adapter_name):
                continue
            base = module.get_base_layer()
            kept = base.weight.data
            if isinstance(module, LoraLinear) and not module.fan_in_fan_out:
                # W + s * B @ A in one kernel (get_delta_weight makes three tensors), into the
                # layer's fusion buffer: kept from one fusion to the next, as a fresh tensor
                # each time costs a CPU its pages again (11.5 against 7.2 ms for 66 MB, measured
                # once with a throwaway script).
                lora_a, lora_b = (
                    module.lora_A[adapter_name].weight,
                    module.lora_B[adapter_name].weight,
                )
                scale = module.scaling[adapter_name]
                fused = self._fusion_buffer(module, kept)
                with torch.no_grad():  # out= takes no tensor that requires grad
                    torch.addmm(
                        kept, lora_b.to(kept.dtype), lora_a.to(kept.dtype), alpha=scale, out=fused
                    )
                base.weight.data = fused
            else:
                base.weight.data = kept + module.get_delta_weight(adapter_name).to(kept.dtype)
            module.merged_adapters.append(adapter_name)  # peft's forward then skips the LoRA
            self._fused.append((module, kept, adapter_name))

    def _fusable(self, path: str, module: LoraLayer, adapter_name: str) -> bool:
        """Whether `_fuse` adds this layer's delta for `adapter_name` into its weights: a
        plain LoRA layer of the denoiser (DoRA and the like, and a LoRA bias, stay unfused)."""
        return (
            path.startswith(f"{self.family.denoiser_component}.")
            and isinstance(module, LoraLayer)
            and adapter_name in module.lora_A
            and adapter_name not in module.lora_variant
            and not module.lora_bias.get(adapter_name)
            and not module.merged
        )

    def _fusion_buffer(self, module: LoraLayer, like: torch.Tensor) -> torch.Tensor:
        buffer = self._fusion_buffers.get(module)
        if (
            buffer is None
            or buffer.shape != like.shape
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = self._fusion_buffers[module] = torch.empty_like(like)
        return buffer

    def _unfuse(self) -> None:
        for layer, kept in reversed(self._lycoris_fused):
            layer.weight.data = kept
        self._lycoris_fused = []
        for module, kept, adapter_name in self._fused:
            module.get_base_layer().weight.data = kept
            module.merged_adapters.remove(adapter_name)
        self._fused = []

    def _scale_blocks(self, adapters: list[ActiveAdapter]) -> None:
        """After each layer got its adapter's strength: strength x block weight in the
        weighted blocks of the denoiser. peft's `set_scale` multiplies in alpha/rank itself."""
        denoiser_prefix = f"{self.family.denoiser_component}."
        for adapter in adapters:
            weights = dict(adapter.block_scales)
            layers = self._layers.get(adapter.adapter_name) or self._find_layers(
                adapter.adapter_name
            )
            for path, module in layers.items():
                if not path.startswith(denoiser_prefix):
                    continue
                found = self.blocks.block_of(path.removeprefix(denoiser_prefix))
                if found is not None and found[0] in weights:
                    group, index = found
                    module.set_scale(adapter.adapter_name, adapter.strength * weights[group][index])


def _views_of(flat: torch.Tensor, layout: ByteLayout, parameters: dict) -> bool:
    """Whether the parameters still view their places in `flat`. Only a move of the whole
    model (`.to()`) re-points them, so the first and last matrix tell."""
    start = flat.data_ptr()
    ends = (layout.matrices[0], layout.matrices[-1])
    return all(parameters[matrix.key].data_ptr() == start + matrix.begin for matrix in ends)


def _signature_of(converted: dict[str, torch.Tensor]) -> Signature:
    return frozenset((key, tuple(tensor.shape)) for key, tensor in converted.items())


def _describe(error: Exception) -> str:
    """The error's message, or its type where it has none (a converter's bare assert)."""
    return str(error) or f"{type(error).__name__} in diffusers' LoRA conversion"


def _activate_component(component, names: list[str], weights: list[float]) -> None:
    if isinstance(component, ModelMixin):
        if not names:
            component.disable_lora()
            return
        component.enable_lora()
        component.set_adapters(names, weights)
        return
    if not names:
        disable_lora_for_text_encoder(component)
        return
    enable_lora_for_text_encoder(component)
    set_adapters_for_text_encoder(names, component, weights)
