"""A LoRA file's keys as diffusers converts them, without loading: what `load_lora_weights`
would give each layer, in peft's key layout (`<component>.<module>.lora_A.weight`).

diffusers converts most ecosystem layouts itself (`lora_state_dict`); `renamed` first brings
the layouts it misses to ones it reads: peft's own saved layout, diffusers' module paths with
underscores (OneTrainer, AI Toolkit's LyCORIS), and the family's renames (`lora_keys.py`).
"""

from __future__ import annotations

import inspect

import torch
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

from deployments.family import Family
from deployments.lora_anatomy import PEFT_PREFIX

# OneTrainer's and AI Toolkit's LyCORIS prefixes over diffusers' module paths (`_` for `.`).
_UNDERSCORED_PATH_PREFIXES = ("lora_transformer_", "lycoris_")


class LoraConverter:
    def __init__(self, pipe, family: Family):
        self.pipe = pipe
        self.family = family
        self._underscored: dict[str, dict[str, str]] = {}  # see `_underscored_paths`

    def renamed(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's keys in a layout diffusers converts: peft's own saved layout
        (`base_model.model.<module>`) under the denoiser, diffusers' module paths written
        with underscores (OneTrainer, AI Toolkit's LyCORIS) as paths, and the family's
        renames."""
        if any(key.startswith(PEFT_PREFIX) for key in tensors):
            denoiser = f"{self.family.denoiser_component}."
            tensors = {_peft_key(key, denoiser): tensor for key, tensor in tensors.items()}
        if any(key.startswith(_UNDERSCORED_PATH_PREFIXES) for key in tensors):
            tensors = self._paths_of_underscored(tensors)
        if self.family.convert_lora is None:
            return tensors
        return self.family.convert_lora(tensors)

    def _paths_of_underscored(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """OneTrainer's `lora_transformer_<path with _ for .>` (and its `lora_te1_` CLIP
        part) and AI Toolkit's `lycoris_<path>`: diffusers' own module names, which its
        converters read only in part (OneTrainer's Flux MLP keys collapse onto one module).
        Each stem is looked up among the model's module paths; LoRA pairs become peft keys
        with alpha / rank folded into lora_B. A file whose stems do not all resolve is
        returned as it is, for diffusers to convert or refuse."""
        components = {
            prefix: self.family.denoiser_component for prefix in _UNDERSCORED_PATH_PREFIXES
        }
        if any(key.startswith("lora_transformer_") for key in tensors):
            components.update({"lora_te1_": "text_encoder", "lora_te_": "text_encoder"})
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        renamed: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            prefix = next((p for p in components if key.startswith(p)), None)
            if prefix is None:
                renamed[key] = tensor
                continue
            stem, _, suffix = key.partition(".")
            path = self._underscored_paths(components[prefix]).get(stem.removeprefix(prefix))
            if path is None:
                return tensors
            grouped.setdefault(f"{components[prefix]}.{path}", {})[suffix] = tensor
        for stem, parts in grouped.items():
            if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                renamed.update({f"{stem}.{suffix}": t for suffix, t in parts.items()})
                continue
            down, up, alpha = parts.pop("lora_down.weight"), parts.pop("lora_up.weight"), None
            if "alpha" in parts:
                alpha = float(parts.pop("alpha").reshape(-1)[0])
            scale = alpha / down.shape[0] if alpha else 1.0
            renamed[f"{stem}.lora_A.weight"] = down
            renamed[f"{stem}.lora_B.weight"] = up * scale if scale != 1 else up
            renamed.update({f"{stem}.{suffix}": t for suffix, t in parts.items()})
        return renamed

    def _underscored_paths(self, attr: str) -> dict[str, str]:
        """`<module path with _ for .>` -> module path, for the component's layers (CLIP's
        also under kohya's `text_model_`, which transformers 5 dropped from the paths)."""
        if attr not in self._underscored:
            component = getattr(self.pipe, attr, None)
            paths: dict[str, str] = {}
            for path, module in component.named_modules() if component is not None else ():
                path = path.replace(".base_layer", "")
                if isinstance(getattr(module, "weight", None), torch.Tensor):
                    paths[path.replace(".", "_")] = path
                    paths["text_model_" + path.replace(".", "_")] = path
            self._underscored[attr] = paths
        return self._underscored[attr]

    def convert(self, copies: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """diffusers' format conversion (`lora_state_dict`) of renamed copies, in the key layout
        peft gives the loaded layers, and the network alphas it reports (kohya `.alpha`, which
        a load turns into per-module scales; empty where none). Raises what diffusers raises."""
        converted = self.pipe.lora_state_dict(copies, **self.conversion_kwargs())
        alphas = None
        if isinstance(converted, tuple):
            converted, alphas = converted[0], converted[1]
        return self._peft_layout(converted), alphas or {}

    def conversion_kwargs(self) -> dict:
        kwargs = {}
        if getattr(self.pipe, "unet", None) is not None:
            kwargs["unet_config"] = self.pipe.unet.config  # maps kohya SDXL's SGM block names
        if "return_alphas" in inspect.signature(self.pipe.lora_state_dict).parameters:
            kwargs["return_alphas"] = True  # Flux's reports kohya alphas only when asked
        return kwargs

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


def _peft_key(key: str, denoiser_prefix: str) -> str:
    if key.startswith(PEFT_PREFIX):
        return denoiser_prefix + key.removeprefix(PEFT_PREFIX)
    return key


def _text_encoder_peft_layout(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    except ValueError:  # a layout diffusers does not know: left as is, to be counted unmatched
        return part
