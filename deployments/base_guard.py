"""The base model as loaded, kept to tell whether a LoRA load changed it, and to put it back.

The check (`lora_check.py`) refuses every file known to reshape a base layer, but diffusers'
loaders may change a model in ways no check foresaw: widen a layer by swapping in a new
module and rewrite the config (Flux Control LoRAs), or overwrite norm weights. After each
fresh load the replica compares its base layers with this record: the same module objects,
the same parameter objects and shapes, the same config, and the same values at a few sampled
places per parameter (a fingerprint, not a checksum: cheap beside a load). What differs is
put back from the objects kept here; values overwritten in place cannot be, and the replica
is then reported broken so Serve replaces it.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

SAMPLES_PER_PARAMETER = 8
_WRAPPER_ATTRIBUTE = ".base_layer"


class BaseGuard:
    def __init__(self, pipe, components: tuple[str, ...]):
        self._pipe = pipe
        # (component, module path) -> the base module and its own parameters as loaded.
        self._modules: dict[tuple[str, str], torch.nn.Module] = {}
        self._parameters: dict[tuple[str, str], dict[str, torch.nn.Parameter]] = {}
        self._configs: dict[str, dict] = {}
        for attr in components:
            component = getattr(pipe, attr, None)
            if component is None:
                continue
            if hasattr(component, "register_to_config"):
                self._configs[attr] = dict(component.config)
            for path, module in component.named_modules():
                if isinstance(module, BaseTunerLayer) or ".lora_" in f".{path}":
                    continue
                own = dict(module.named_parameters(recurse=False))
                if own:
                    key = (attr, path.replace(_WRAPPER_ATTRIBUTE, ""))
                    self._modules[key] = module
                    self._parameters[key] = own
        self._fingerprint = self._sample()

    def changes(self) -> list[str]:
        """What differs from the model as loaded, one line per change (empty: nothing)."""
        found = []
        for (attr, path), module in self._modules.items():
            if self._base_at(attr, path) is not module:
                found.append(f"{attr}.{path} was replaced")
                continue
            for name, parameter in self._parameters[(attr, path)].items():
                now = getattr(module, name, None)
                if now is not parameter or now.shape != parameter.shape:
                    found.append(f"{attr}.{path}.{name} was replaced")
        for attr, config in self._configs.items():
            component = getattr(self._pipe, attr)
            for key, value in config.items():
                if (
                    getattr(component.config, key, value) != value
                    or component.config.get(key) != value
                ):
                    found.append(f"{attr}.config.{key} changed")
        if not found and self._sample() != self._fingerprint:
            found.append("base weights were overwritten in place")
        return found

    def restore(self) -> list[str]:
        """Put back every replaced module, parameter and config value; returns what could
        not be put back (values overwritten in place)."""
        for (attr, path), module in self._modules.items():
            current = self._base_at(attr, path)
            if current is not module:
                self._put_back(attr, path, module)
            for name, parameter in self._parameters[(attr, path)].items():
                if getattr(module, name, None) is not parameter:
                    setattr(module, name, parameter)
        for attr, config in self._configs.items():
            component = getattr(self._pipe, attr)
            changed = {k: v for k, v in config.items() if component.config.get(k) != v}
            if changed:
                component.register_to_config(**changed)
            for key, value in config.items():
                if getattr(component.config, key, value) != value:
                    # diffusers' Flux loader sets the attribute on the config object itself.
                    object.__setattr__(component.config, key, value)
        return [change for change in self.changes()]

    def _base_at(self, attr: str, path: str) -> torch.nn.Module | None:
        component = getattr(self._pipe, attr)
        try:
            module = component.get_submodule(path) if path else component
        except AttributeError:
            return None
        while isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        return module

    def _put_back(self, attr: str, path: str, module: torch.nn.Module) -> None:
        component = getattr(self._pipe, attr)
        parent_path, _, name = path.rpartition(".")
        parent = component.get_submodule(parent_path) if parent_path else component
        current = getattr(parent, name, None)
        if isinstance(current, BaseTunerLayer) and any(
            len(getattr(current, layer_name, {})) for layer_name in current.adapter_layer_names
        ):
            current.base_layer = module  # other adapters' layers stay around the original
        else:
            setattr(parent, name, module)

    def _sample(self) -> tuple[float, ...]:
        """A few values of every base parameter, read in one transfer per device."""
        samples = []
        with torch.no_grad():
            for parameters in self._parameters.values():
                for parameter in parameters.values():
                    flat = parameter.detach().reshape(-1)
                    if flat.is_meta or flat.numel() == 0:
                        continue
                    step = max(1, flat.numel() // SAMPLES_PER_PARAMETER)
                    samples.append(flat[::step][:SAMPLES_PER_PARAMETER].float().sum())
        if not samples:
            return ()
        return tuple(torch.stack(samples).tolist())
