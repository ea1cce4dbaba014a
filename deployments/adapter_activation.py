"""Which adapters of a pipeline are active, at what strengths, and fused or not.

A request's stack is activated before each generation. A switch between hot stacks sets only
the layers either stack uses (`_activate_layers`); after a fresh load or a delete, which
change layers' states, the library activates every component (`_activate_components`). A
single plain LoRA may be fused into the denoiser's weights (`fuse_single`), and LoKr / LoHa
deltas are always added into the base weights; both are put back bit for bit by `unfuse`.
In compiled mode every stack is fused and every denoiser LoRA layer marked merged
(`fused_stacks.py`), unless a layer cannot be fused: the stack then runs eagerly, unfused.
"""

from __future__ import annotations

from collections.abc import Callable
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

from deployments.blocks import BlockLayout, BlockScales
from deployments.family import Family
from deployments.fused_stacks import FUSED_MARKER, fused_weight, mark_merged, unfusable_reason
from deployments.lycoris import LycorisAdapter


@dataclass(frozen=True)
class ActiveAdapter:
    adapter_name: str
    strength: float
    clip_strength: float
    block_scales: BlockScales = ()
    """Denoiser weights per block (`PipelineAdapters.block_scales`); other blocks: 1."""


class AdapterActivation:
    """The applied stack of one pipeline's adapters. Reads the adapters' layers (peft) and
    LyCORIS factors from the dicts it is given, which their owner keeps current."""

    def __init__(
        self,
        pipe,
        family: Family,
        blocks: BlockLayout,
        layers: dict[str, dict[str, LoraLayer]],
        lycoris_adapters: dict[str, LycorisAdapter],
        find_layers: Callable[[str], dict[str, LoraLayer]],
        fuse_single: bool = False,
    ):
        self.pipe = pipe
        self.family = family
        self.blocks = blocks
        self.fuse_single = fuse_single
        self._layers = layers
        self._lycoris_adapters = lycoris_adapters
        self._find_layers = find_layers
        # The stack applied now, or None when unknown (the next activation goes through the
        # library).
        self.active: tuple[ActiveAdapter, ...] | None = None
        # Denoiser layers whose weights hold a fused adapter: (layer, base weight, adapter).
        self.fused: list[tuple[LoraLayer, torch.Tensor, str]] = []
        # Per denoiser layer, the tensor its fused weights are written into: one more copy of
        # the adapted weights, as a fused adapter needs anyway, kept from one fusion to the next.
        self._fusion_buffers: dict[LoraLayer, torch.Tensor] = {}
        self._lycoris_fused: list[tuple[torch.nn.Module, torch.Tensor]] = []  # (layer, kept)
        # Compiled mode (set by deployments/compiled.py): every stack fused, and why the
        # applied one could not be, as (adapter name, reason), or None.
        self.compiled = False
        self.eager_reason: tuple[str, str] | None = None
        # Denoiser LoRA layers marked merged with no delta of the stack, and every denoiser
        # LoRA layer (found again after a load or a delete, which may wrap new modules).
        self._marked: list[LoraLayer] = []
        self._denoiser_layers: list[LoraLayer] | None = None

    def reset(self) -> None:
        """Unfuse and forget the applied stack: layers are about to change (a load, a delete)."""
        self.unfuse()
        self.active = None
        self._denoiser_layers = None

    def drop_unused_buffers(self) -> None:
        """Layers left with no adapter are never fused again."""
        self._fusion_buffers = {
            module: buffer for module, buffer in self._fusion_buffers.items() if module.lora_A
        }

    def activate(self, adapters: list[ActiveAdapter]) -> None:
        """Make exactly these adapters active, at these strengths, in request order."""
        wanted = tuple(adapters)
        if wanted == self.active:
            return
        self.unfuse()
        # LoKr / LoHa adapters hold no peft layers: the library activates the LoRAs, and the
        # LyCORIS deltas are added into the base weights after.
        lycoris = self._lycoris_adapters
        loras = tuple(a for a in wanted if a.adapter_name not in lycoris)
        applied = tuple(a for a in self.active or () if a.adapter_name not in lycoris)
        single = self.fuse_single and len(wanted) == 1 and len(loras) == 1
        fusing = loras[0].adapter_name if single else None
        if self.compiled:
            self.eager_reason = self._unfusable(loras)
            fusing = None
        if self.active is not None and all(a.adapter_name in self._layers for a in applied + loras):
            self._activate_layers(applied, loras, fusing)
        else:
            self._activate_components(list(loras))
        self.active = wanted
        if self.compiled and self.eager_reason is None:
            self._fuse_stack(loras)
        elif fusing is not None:
            self._fuse(fusing)
        self._fuse_lycoris([a for a in wanted if a.adapter_name in self._lycoris_adapters])

    def _fuse_lycoris(self, adapters: list[ActiveAdapter]) -> None:
        """Add each active LoKr / LoHa adapter's delta, at its strength (text encoders: its
        clip strength; weighted blocks: times the block's weight), into the base weights it
        changes; `_unfuse` puts the kept weights back, bit for bit."""
        denoiser_prefix = f"{self.family.denoiser_component}."
        for adapter in adapters:
            weights = dict(adapter.block_scales)
            for path, layer, delta in self._lycoris_adapters[adapter.adapter_name].deltas():
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
            self.fused.append((module, kept, adapter_name))

    def _fuse_stack(self, adapters: tuple[ActiveAdapter, ...]) -> None:
        """Compiled mode: the whole stack's deltas, at the scales just set, into the denoiser's
        weights (into each layer's fusion buffer), and every denoiser LoRA layer marked merged,
        those the stack does not use included, so their forward is always `base_layer(x)`."""
        names = [a.adapter_name for a in adapters]
        for module in self._denoiser_lora_layers():
            here = [name for name in names if name in module.lora_A]
            if here:
                base = module.get_base_layer()
                kept = base.weight.data
                buffer = self._fusion_buffer(module, kept)
                base.weight.data = fused_weight(module, here, kept, buffer)
                self.fused.append((module, kept, FUSED_MARKER))  # `unfuse` takes the marker
            else:
                self._marked.append(module)
            mark_merged(module)

    def _unfusable(self, adapters: tuple[ActiveAdapter, ...]) -> tuple[str, str] | None:
        prefix = f"{self.family.denoiser_component}."
        for adapter in adapters:
            name = adapter.adapter_name
            why = unfusable_reason(self._layers.get(name) or self._find_layers(name), name, prefix)
            if why is not None:
                return name, why
        return None

    def _denoiser_lora_layers(self) -> list[LoraLayer]:
        if self._denoiser_layers is None:
            denoiser = getattr(self.pipe, self.family.denoiser_component)
            self._denoiser_layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]
        return self._denoiser_layers

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

    def unfuse(self) -> None:
        for layer, kept in reversed(self._lycoris_fused):
            layer.weight.data = kept
        self._lycoris_fused = []
        for module, kept, adapter_name in self.fused:
            module.get_base_layer().weight.data = kept
            module.merged_adapters.remove(adapter_name)
        self.fused = []
        for module in self._marked:
            module.merged_adapters.remove(FUSED_MARKER)
        self._marked = []

    def base_values(self) -> dict[int, torch.Tensor]:
        """id(base weight) -> the tensor holding its base values, for each weight an adapter is
        fused into now (what `unfuse` puts back), so the health check compares the base model
        whatever is active (base_guard.py). The first fusion into a weight kept its base."""
        held = {id(module.get_base_layer().weight): kept for module, kept, _ in self.fused}
        for layer, kept in reversed(self._lycoris_fused):
            held[id(layer.weight)] = kept
        return held

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

    def forget_if_using(self, adapter_name: str) -> None:
        """Before an adapter's layers change hands: if the applied stack uses it, unfuse and
        forget the stack (the next request re-activates through the library). Any other stack
        stays applied, and fused: its layers are untouched."""
        if self.active is not None and any(a.adapter_name == adapter_name for a in self.active):
            self.unfuse()
            self.active = None


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
