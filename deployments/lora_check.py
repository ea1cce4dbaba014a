"""Whether a LoRA file fits a loaded model, decided before anything touches the pipeline.

diffusers converts every ecosystem layout (`lora_state_dict`) and peft builds the layers, but
neither refuses what does not fit: a converter drops keys it does not know with a log line,
diffusers' Flux loader widens a base layer for a wider lora_A (a Control LoRA) and changes the
model's config, and DoRA scales in kohya's layout are dropped. So every file is converted here
first, the way a load would, and refused unless each of its tensors lands on a module of this
model at that module's shape. Refusals say what the file is (format, family, kind), what does
not fit, and why, within 500 characters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from deployments import key_probe, lycoris
from deployments.errors import LoraIncompatible
from deployments.family import Family, detect_lora_family
from deployments.lora_anatomy import (
    DOWN_SUFFIXES,
    UP_SUFFIXES,
    FileAnatomy,
    control_input_width,
    text_encoder_prefix,
)
from deployments.lora_convert import LoraConverter

MAX_KEY_EXAMPLES = 3
MAX_CONVERTER_MESSAGE_CHARS = 160
# A text-encoder key prefix -> the pipeline attribute it addresses.
_TEXT_ENCODER_OF_PREFIX = {
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "text_encoder.": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "text_encoder_2.": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "text_encoder_3.": "text_encoder_3",
}


@dataclass
class CheckedFile:
    """A file that fits: what it is, and its tensors as a load takes them."""

    matched: int
    """LoRA matrices (or LyCORIS module parts) that land on a module of the model."""
    anatomy: FileAnatomy
    clones: dict[str, torch.Tensor] = field(default_factory=dict)
    """The file's tensors, cloned, by file key."""
    converted: dict[str, torch.Tensor] = field(default_factory=dict)
    """The converted tensors in peft's layout (`<component>.<module>.lora_A.weight`)."""
    network_alphas: dict = field(default_factory=dict)
    lycoris: dict[str, list[key_probe.Target]] | None = None
    """For a LoKr / LoHa file: where each of its modules goes."""


class LoraChecker:
    """Checks and converts LoRA files for one pipeline. Reads module shapes only, so it is safe
    beside a generation, and works on a model built on the meta device."""

    def __init__(self, pipe, family: Family):
        self.pipe = pipe
        self.family = family
        self.converter = LoraConverter(pipe, family)
        # `<component>.<module>` -> the module's weight shape, or None for no such module:
        # looked up once per module, not per check. Cleared after each fresh load.
        self._shapes: dict[str, tuple[int, ...] | None] = {}

    def forget_shapes(self) -> None:
        self._shapes = {}

    def check(self, tensors: dict[str, torch.Tensor], label: str) -> CheckedFile:
        """The file converted and checked; LoraIncompatible naming what does not fit."""
        anatomy = FileAnatomy.of(tensors)
        detected = detect_lora_family(tensors)
        foreign = detected is not None and _same_model(detected) != _same_model(self.family.name)
        made_for = detected if foreign else self.family.name
        kind = "Control LoRA" if anatomy.kind == "Control" else anatomy.kind
        layout = anatomy.format if anatomy.format != "unknown" else "unknown-layout"
        what = f"a {layout} {made_for} {kind}"
        refuse = _Refusal(label, what)
        if anatomy.kind == "Control":
            module, width = control_input_width(tensors)
            refuse(
                f"{module} takes {width} inputs, this model {self._input_width()}: control "
                "LoRAs need a control pipeline"
            )
        if anatomy.counts.get("dora_scale"):
            refuse(
                f"DoRA adapters are not supported in the {anatomy.format} layout "
                f"({anatomy.counts['dora_scale']} dora_scale tensors); a DoRA saved by peft or "
                "diffusers (lora_magnitude_vector) loads"
            )
        try:
            if not foreign:  # another model's encoders are no news beside its denoiser
                self._refuse_foreign_text_encoders(tensors, refuse)
            if anatomy.kind in ("LoKr", "LoHa"):
                return self._check_lycoris(tensors, anatomy, refuse)
            return self._check_lora(tensors, anatomy, refuse)
        except LoraIncompatible as e:
            if not foreign:
                raise
            why = e.message.removeprefix(refuse.prefix)
            raise LoraIncompatible(
                f"Failed to load LoRA: {label}: {what} cannot be used with {self.family.name} "
                f"({why})"
            ) from e

    def _check_lora(self, tensors, anatomy: FileAnatomy, refuse) -> CheckedFile:
        clones = {key: tensor.clone() for key, tensor in tensors.items()}
        copies = self.converter.renamed(dict(clones))
        try:
            converted, network_alphas = self.converter.convert(copies)
        except Exception as e:
            refuse(f"diffusers' conversion of its {anatomy.format} keys failed: {_summary(e)}")
        matrices = [k for k in converted if k.endswith((".lora_A.weight", ".lora_B.weight"))]
        unmatched, reshaped = [], []
        for key in converted:
            fits = self._fits(key, converted[key])
            if fits is None:
                unmatched.append(key)
            elif not fits:
                reshaped.append(key)
        if reshaped:
            refuse(self._reshape_reason(reshaped[0], converted[reshaped[0]]))
        matched = len(matrices) - len([k for k in unmatched if k in matrices])
        dropped = self._dropped(copies)
        if matched == 0 or unmatched or dropped:
            examples = ", ".join((unmatched + dropped or list(tensors))[:MAX_KEY_EXAMPLES])
            lost = f" ({2 * len(dropped)} dropped by the format conversion)" if dropped else ""
            others = len(unmatched) - (len(matrices) - matched)
            other = f"; {others} other tensors fit no module" if others else ""
            total = len(matrices) + 2 * len(dropped)
            refuse(
                f"{matched} of {total or len(tensors)} LoRA matrices match the "
                f"{self.family.name} model{lost}{other}; unmatched e.g. {examples}"
            )
        return CheckedFile(matched, anatomy, clones, converted, network_alphas)

    def _dropped(self, copies: dict[str, torch.Tensor]) -> list[str]:
        """The down-matrix keys of the file's modules that the conversion places nowhere."""
        modules, passthrough = {}, {}
        for key, tensor in copies.items():
            suffix = next((s for s in DOWN_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                continue
            stem = key.removesuffix(suffix)
            up_key = stem + UP_SUFFIXES[DOWN_SUFFIXES.index(suffix)]
            up = copies.get(up_key)
            if up is None or tensor.ndim < 2 or up.ndim < 2:
                return [key]  # half a LoRA pair: nothing a converter could place whole
            alpha_key = f"{stem}.alpha" if f"{stem}.alpha" in copies else None
            modules[stem] = key_probe.ProbeModule(
                key, up_key, alpha_key, int(up.shape[0]), int(math.prod(tensor.shape[1:]))
            )
        probed = {m.down_key for m in modules.values()} | {m.up_key for m in modules.values()}
        probed |= {m.alpha_key for m in modules.values()}
        passthrough = {k: v for k, v in copies.items() if k not in probed}
        try:
            landed = key_probe.probe(
                modules, lambda p: self.converter.convert(p)[0], passthrough, positions=False
            )
        except Exception:  # the conversion already succeeded on the real values: trust it
            return []
        return [module.down_key for stem, module in modules.items() if stem not in landed]

    def _check_lycoris(self, tensors, anatomy: FileAnatomy, refuse) -> CheckedFile:
        try:
            modules = lycoris.modules_of(self.converter.renamed(dict(tensors)))
            targets = key_probe.probe(
                lycoris.probe_modules(modules), lambda probes: self.converter.convert(probes)[0]
            )
        except (lycoris.LycorisError, key_probe.ProbeError) as e:
            refuse(str(e))
        except Exception as e:
            refuse(f"diffusers' conversion of its {anatomy.format} keys failed: {_summary(e)}")
        dropped = [stem for stem in modules if stem not in targets]
        parts = [target for found in targets.values() for target in found]
        for target in parts:
            shape = self._shape(target.path)
            if shape is None:
                dropped.append(target.path)
            elif (len(target.rows), len(target.columns)) != (shape[0], math.prod(shape[1:])):
                refuse(
                    f"{target.path} is {shape[0]}x{math.prod(shape[1:])}, its {anatomy.kind} "
                    f"delta {len(target.rows)}x{len(target.columns)}: it is for another model"
                )
        if dropped or not parts:
            refuse(
                f"{len(modules) - len(dropped)} of {len(modules)} {anatomy.kind} modules match "
                f"the {self.family.name} model; unmatched e.g. "
                + ", ".join((dropped or list(modules))[:MAX_KEY_EXAMPLES])
            )
        return CheckedFile(len(parts), anatomy, lycoris=targets)

    def _refuse_foreign_text_encoders(self, tensors, refuse) -> None:
        """A text-encoder part this family does not load (Flux's T5: OneTrainer's `lora_te2_`,
        kohya's `lora_te3_`) is refused by name, not dropped by a converter."""
        foreign: dict[str, int] = {}
        for key in tensors:
            prefix = text_encoder_prefix(key)
            attr = _TEXT_ENCODER_OF_PREFIX.get(prefix or "", prefix)
            if prefix is not None and attr not in self.family.text_encoder_components:
                foreign[prefix] = foreign.get(prefix, 0) + 1
        if foreign:
            prefix, count = max(foreign.items(), key=lambda item: item[1])
            attr = _TEXT_ENCODER_OF_PREFIX.get(prefix, prefix.rstrip("."))
            if getattr(self.pipe, attr, None) is None:
                # Trainers number encoders their own way (Flux's T5 is OneTrainer's lora_te2_
                # and kohya's lora_te3_): name the encoder this model has and does not load.
                others = [
                    name
                    for name in ("text_encoder_2", "text_encoder_3")
                    if getattr(self.pipe, name, None) is not None
                    and name not in self.family.text_encoder_components
                ]
                attr = others[0] if others else attr
            encoder = getattr(self.pipe, attr, None)
            name = f"{type(encoder).__name__} ({attr})" if encoder is not None else attr
            loads = ", ".join(self.family.lora_components)
            refuse(
                f"it has a text-encoder part for {name}: {count} tensors under {prefix}; "
                f"{self.family.name} LoRAs load into {loads} only"
            )

    def _reshape_reason(self, key: str, tensor: torch.Tensor) -> str:
        path, _, kind = key.rpartition(".lora_")
        shape = self._shape(path)
        if kind.startswith("A"):
            theirs, ours, side = tensor.shape[1], shape[1] if len(shape) > 1 else None, "inputs"
        else:
            theirs, ours, side = tensor.shape[0], shape[0], "outputs"
        if side == "inputs" and path.rpartition(".")[2] in ("x_embedder", "img_in"):
            return (
                f"{path} takes {theirs} inputs, this model {ours}: it is a Control LoRA, and "
                "control LoRAs need a control pipeline"
            )
        return (
            f"{path} takes {ours} {side}, the file's matrix {theirs}: loading it would reshape "
            "the model's layer, so it is for another model"
        )

    def _input_width(self) -> int | str:
        denoiser = getattr(self.pipe, self.family.denoiser_component)
        config = getattr(denoiser, "config", {})
        return config.get("in_channels", "?") if hasattr(config, "get") else "?"

    # --- shapes ------------------------------------------------------------------------------

    def fits(self, key: str, tensor: torch.Tensor) -> bool:
        """Whether a converted tensor lands on a module of this model at its shape."""
        return bool(self._fits(key, tensor))

    def _fits(self, key: str, tensor: torch.Tensor) -> bool | None:
        """True: the tensor fits its module; False: the module exists at another shape (a
        load would reshape it); None: no such module, or not a tensor a LoRA layer takes."""
        attr = key.partition(".")[0]
        if attr not in self.family.lora_components:
            return None
        path, kind = _split_key(key)
        if kind is None:
            return None
        shape = self._shape(path)
        if shape is None:
            return None
        out_features, in_features = shape[0], shape[1] if len(shape) > 1 else None
        if kind == "A":
            return tensor.ndim >= 2 and tensor.shape[1] == in_features
        if kind == "B":
            return tensor.ndim >= 2 and tensor.shape[0] == out_features
        return tensor.ndim == 1 and tensor.shape[0] == out_features

    def _shape(self, path: str) -> tuple[int, ...] | None:
        shapes = self._shapes  # a fresh load may replace it beside this check
        if path not in shapes:
            shapes[path] = self._module_shape(path)
        return shapes[path]

    def _module_shape(self, path: str) -> tuple[int, ...] | None:
        attr, _, module_path = path.partition(".")
        component = getattr(self.pipe, attr, None)
        if component is None:
            return None
        try:
            module = component.get_submodule(module_path)
        except AttributeError:
            return None
        module = getattr(module, "base_layer", module)  # peft wraps a layer holding adapters
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
            return None
        return tuple(weight.shape)


class _Refusal:
    """Raises LoraIncompatible as `Failed to load LoRA: <label>: <what the file is>: <why>`."""

    def __init__(self, label: str, what: str):
        self.prefix = f"Failed to load LoRA: {label}: {what}: "

    def __call__(self, why: str):
        raise LoraIncompatible(self.prefix + why)


_TENSOR_ENDINGS = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "bias"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"),
)


def _split_key(key: str) -> tuple[str, str | None]:
    """(module path, what the tensor is to a LoRA layer: A, B, bias, magnitude or None)."""
    for ending, kind in _TENSOR_ENDINGS:
        if key.endswith(ending):
            return key.removesuffix(ending), kind
    return key, None


def _same_model(family: str) -> str:
    """Qwen-Image-Edit serves Qwen-Image's LoRAs: the same transformer, the same names."""
    return "qwen_image" if family == "qwen_image_edit" else family


def _summary(error: Exception) -> str:
    """A converter's exception in one short line: its type and the start of its message
    (diffusers' asserts can carry the whole key list)."""
    text = " ".join(str(error).split())
    if len(text) > MAX_CONVERTER_MESSAGE_CHARS:
        text = text[: MAX_CONVERTER_MESSAGE_CHARS - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
