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

import gc
import hashlib
import inspect
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
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from deployments import byte_layouts
from deployments.blocks import BlockLayout, BlockScales
from deployments.byte_layouts import ByteLayout
from deployments.family import Family, detect_lora_family
from serve.errors import LoraIncompatible
from serve.loras.files import parse_lora_file, read_header
from serve.loras.formats import adapter_configs, apply_metadata_alpha

MAX_KEY_EXAMPLES = 3
MAX_BYTE_LAYOUTS = 256  # file layouts remembered per pipeline (`prepare`), least recent dropped
# Headers up to this size are also remembered whole, as the fastest key; longer ones (kohya's
# metadata can be large) only by their tensor entries, so the keys stay small.
MAX_RAW_KEY_BYTES = 256 * 1024
SLOT_NAME_PREFIX = "lx_slot"  # adapters loaded through `load_reusing`
# Converters drop what they cannot place, so a few leftovers are tolerated; more means the file
# was made for another model, and loading it would silently change less than its author meant.
MAX_UNMATCHED_SHARE = 0.05
# The key endings of a LoRA's down (A) matrix in every layout diffusers reads: one per module.
LORA_DOWN_SUFFIXES = (
    ".lora_A.weight",
    ".lora_down.weight",
    ".lora.down.weight",
    "_lora.down.weight",
)


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
        # `<component>.<module>` -> (in, out features), or None for no such module: looked up
        # once per module, not per check (a cold load's largest cost after the slots). Dropped
        # on each fresh load, which may reshape a base layer (diffusers' Flux loader widens
        # some for Control LoRAs).
        self._features: dict[str, tuple | None] = {}
        self._slots_made = 0
        # Loads that built new layers (diffusers' `load_lora_weights`): no free slot fit. Every
        # other load refilled a slot, at a small part of the cost.
        self.fresh_loads = 0
        # File layouts seen, by raw header bytes and by header entries (`byte_layouts`). Kept
        # over fresh loads: the one load that reshapes base layers (a Flux Control LoRA, whose
        # wider lora_A makes diffusers widen the base layer) is refused by `check` first.
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

    def block_scales(self, block_weights: dict, field: str) -> BlockScales:
        """A request's `block_weights` as one weight per block of this model; InvalidRequest
        naming `field` for an unknown group or a list of the wrong length."""
        return self.blocks.scales(block_weights, field)

    def check(self, tensors: dict[str, torch.Tensor], label: str) -> int:
        """Count the file's LoRA matrices that fit a module of this model, without touching the
        pipeline; LoraIncompatible when too few fit, naming the family the file is for when its
        keys say. Safe to call beside a generation."""
        return self._checked(tensors, label)[0]

    def _checked(
        self, tensors: dict[str, torch.Tensor], label: str
    ) -> tuple[int, dict, dict, dict]:
        """`check`, returning also what it converted: (matched, clones of `tensors` by file
        name, converted tensors in peft's layout, network alphas)."""
        try:
            return self._count_matches(tensors, label)
        except LoraIncompatible as e:
            made_for = detect_lora_family(tensors)
            if made_for is None or made_for == self.family.name:
                raise
            raise LoraIncompatible(
                f"Failed to load LoRA: {label}: a {made_for} LoRA cannot be used with "
                f"{self.family.name} ({e.message.split(': ', 2)[-1]})"
            ) from e

    def _count_matches(self, tensors: dict[str, torch.Tensor], label: str) -> tuple:
        clones = {key: tensor.clone() for key, tensor in tensors.items()}
        copies = self._renamed(dict(clones))
        source_modules = sum(key.endswith(LORA_DOWN_SUFFIXES) for key in copies)
        try:
            converted, network_alphas = self._convert(copies)
        except Exception as e:
            raise LoraIncompatible(f"Failed to load LoRA: {label}: {_describe(e)}") from e
        matrices = [key for key in converted if ".lora_A." in key or ".lora_B." in key]
        unmatched = [key for key in matrices if not self._fits(key, converted[key])]
        matched = len(matrices) - len(unmatched)
        # diffusers' converters split fused modules (one becomes several) but never merge them,
        # and drop, with at most a log line, the keys they do not know: fewer modules out than
        # in means some of the file would silently not be applied. Counted as unmatched.
        converted_modules = sum(".lora_A." in key for key in converted)
        dropped = 2 * max(0, source_modules - converted_modules)
        total = len(matrices) + dropped
        if matched == 0 or len(unmatched) + dropped > MAX_UNMATCHED_SHARE * total:
            if dropped and len(unmatched) < MAX_KEY_EXAMPLES:
                unmatched += self._dropped_examples(copies)
            examples = ", ".join((unmatched or list(tensors))[:MAX_KEY_EXAMPLES])
            lost = f" ({dropped} dropped by the format conversion)" if dropped else ""
            raise LoraIncompatible(
                f"Failed to load LoRA: {label}: {matched} of {total or len(tensors)} "
                f"LoRA matrices match the {self.family.name} model{lost}; unmatched e.g. "
                f"{examples}"
            )
        return matched, clones, converted, network_alphas

    def _dropped_examples(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Down-matrix keys of modules that diffusers' conversion drops: each module converted
        on its own (only on the way to an error, so the cost does not matter)."""
        examples = []
        for key in tensors:
            suffix = next((s for s in LORA_DOWN_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                continue
            stem = key.removesuffix(suffix)
            prefixes = (f"{stem}.", f"{stem}_lora.")
            module = {k: v.clone() for k, v in tensors.items() if k.startswith(prefixes)}
            try:
                converted = self.pipe.lora_state_dict(module, **self._conversion_kwargs())
                converted = converted[0] if isinstance(converted, tuple) else converted
                survived = any(".lora_A." in k or "down" in k for k in converted)
            except Exception:
                survived = False
            if not survived:
                examples.append(key)
                if len(examples) == MAX_KEY_EXAMPLES:
                    break
        return examples

    def _copies(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Renamed copies of a file's tensors, to convert: converters may scale tensors in place
        (diffusers' ComfyUI Wan converter does), and the caller's are loaded next."""
        return self._renamed({key: tensor.clone() for key, tensor in tensors.items()})

    def _conversion_kwargs(self) -> dict:
        kwargs = {}
        if getattr(self.pipe, "unet", None) is not None:
            kwargs["unet_config"] = self.pipe.unet.config  # maps kohya SDXL's SGM block names
        if "return_alphas" in inspect.signature(self.pipe.lora_state_dict).parameters:
            kwargs["return_alphas"] = True  # Flux's reports kohya alphas only when asked
        return kwargs

    def _convert(self, copies: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """diffusers' format conversion (`lora_state_dict`) of `_copies`, in the key layout peft
        gives the loaded layers, and the network alphas it reports (kohya `.alpha`, which a
        load turns into per-module scales; empty where none). Raises what diffusers raises."""
        converted = self.pipe.lora_state_dict(copies, **self._conversion_kwargs())
        alphas = None
        if isinstance(converted, tuple):
            converted, alphas = converted[0], converted[1]
        return self._peft_layout(converted), alphas or {}

    def _renamed(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's keys in a layout diffusers converts, where the family needs a rename."""
        if self.family.convert_lora is None:
            return tensors
        return self.family.convert_lora(tensors)

    def _peft_layout(self, converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keys as peft names them once loaded. `lora_state_dict` leaves UNet-family files
        in diffusers' older layouts (`to_q_lora.down`) and CLIP keys with the `text_model.`
        prefix that transformers 5 dropped; `load_lora_weights` renames both on the way in, per
        component, and this does the same renaming, without loading."""
        by_component: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in converted.items():
            attr, _, rest = key.partition(".")
            by_component.setdefault(attr, {})[rest] = tensor
        renamed = {}
        for attr, part in by_component.items():
            if not any(".lora_A." in key or ".lora_B." in key for key in part):
                if attr in self.family.text_encoder_components:
                    part = _text_encoder_peft_layout(part)
                else:
                    part = convert_unet_state_dict_to_peft(part)
            component = getattr(self.pipe, attr, None)
            if attr in self.family.text_encoder_components and not hasattr(component, "text_model"):
                part = {key.removeprefix("text_model."): tensor for key, tensor in part.items()}
            renamed.update({f"{attr}.{key}": tensor for key, tensor in part.items()})
        return renamed

    def _fits(self, key: str, tensor: torch.Tensor) -> bool:
        """Whether `<component>.<module>.lora_{A,B}.weight` names a module this matrix fits."""
        attr, _, rest = key.partition(".")
        if attr not in self.family.lora_components:
            return False
        module_path, _, kind = rest.rpartition(".lora_")
        features = self._features  # a fresh load may replace it beside this check
        path = f"{attr}.{module_path}"
        if path not in features:
            features[path] = self._module_features(attr, module_path)
        if features[path] is None:
            return False
        in_features, out_features = features[path]
        if kind.startswith("A"):
            return tensor.ndim >= 2 and tensor.shape[1] == in_features
        return tensor.ndim >= 2 and tensor.shape[0] == out_features

    def _module_features(self, attr: str, module_path: str) -> tuple | None:
        component = getattr(self.pipe, attr, None)
        try:
            module = component.get_submodule(module_path)
        except AttributeError:
            return None
        in_features = getattr(module, "in_features", getattr(module, "in_channels", None))
        out_features = getattr(module, "out_features", getattr(module, "out_channels", None))
        return in_features, out_features

    def load(self, adapter_name: str, tensors: dict[str, torch.Tensor], label: str) -> int:
        """Inject an adapter; returns its layer count. On any failure the pipeline is unchanged."""
        self._unfuse()
        self._active = None  # diffusers activates what it loads; the next request re-activates
        self._features = {}
        self._signatures.pop(adapter_name, None)
        try:
            self.pipe.load_lora_weights(self._renamed(dict(tensors)), adapter_name=adapter_name)
        except Exception as e:
            self.delete(adapter_name)
            raise LoraIncompatible(f"Failed to load LoRA: {label}: {_describe(e)}") from e
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

    def delete(self, adapter_name: str) -> None:
        """Remove an adapter's layers from every component and free their memory."""
        self._unfuse()
        self._active = None
        self._free.pop(adapter_name, None)
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
        _, clones, converted, network_alphas = self._checked(tensors, label)
        slot_layout = self._slot_layout_of(converted, network_alphas)
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
            converted, network_alphas = self._convert(self._copies(tensors))
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
        return len(self._find_layers(adapter_name))

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
        wanted = tuple(adapters)
        if wanted == self._active:
            return
        self._unfuse()
        fusing = adapters[0].adapter_name if self.fuse_single and len(adapters) == 1 else None
        if self._active is not None and all(
            a.adapter_name in self._layers for a in self._active + wanted
        ):
            self._activate_layers(self._active, wanted, fusing)
        else:
            self._activate_components(adapters)
        self._active = wanted
        if fusing is not None:
            self._fuse(fusing)

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


def _text_encoder_peft_layout(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    except ValueError:  # a layout diffusers does not know: left as is, to be counted unmatched
        return part


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
