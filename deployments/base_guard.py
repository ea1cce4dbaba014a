"""The base model as loaded, kept to tell whether it changed, and to put it back.

The check (`lora_check.py`) refuses every file known to reshape a base layer, but diffusers'
loaders may change a model in ways no check foresaw: widen a layer by swapping in a new
module and rewrite the config (Flux Control LoRAs), or overwrite norm weights. After each
fresh load the replica compares its pipeline with this record, and so does Serve's periodic
health check (`replica_health.py`): the same module objects at the same places, the same
parameter objects, shapes and dtypes, the same config, and the same values at a few sampled
places per parameter (a fingerprint, not a checksum: a change that misses every sampled place
goes unseen, but no check makes a pass over the weights). What differs is put back from the
objects kept here; values overwritten in place cannot be, and the replica is then reported
broken so Serve replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

SAMPLES_PER_PARAMETER = 8
_WRAPPER_ATTRIBUTE = ".base_layer"
# Sampled values are compared as integers of their width, bit for bit: NaN equals itself.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class _Kept:
    """One base parameter as loaded."""

    module: torch.nn.Module
    name: str
    parameter: torch.nn.Parameter
    shape: torch.Size
    dtype: torch.dtype
    data_ptr: int
    samples: torch.Tensor | None
    """A view of its sampled places, made once: a check reads it without making it again
    (four tensor calls per parameter, most of a check's time). None: sampled anew each time
    (not contiguous, so no view; or nothing to sample)."""

    @classmethod
    def of(cls, module: torch.nn.Module, name: str, parameter: torch.nn.Parameter) -> _Kept:
        samples = None
        if parameter.is_contiguous() and not parameter.is_meta and parameter.numel():
            samples = _sampled(parameter)
        return cls(
            module, name, parameter, parameter.shape, parameter.dtype, parameter.data_ptr(), samples
        )


@dataclass(frozen=True)
class _Edge:
    """`parent.<name>` held `child` at load (a peft wrapper around it counts as it)."""

    attr: str
    path: str
    parent: torch.nn.Module
    name: str
    child: torch.nn.Module


class BaseGuard:
    def __init__(self, pipe, components: tuple[str, ...]):
        self._pipe = pipe
        self._components: dict[str, torch.nn.Module] = {}
        # (component, module path) -> the base module's own parameters as loaded.
        self._parameters: dict[tuple[str, str], list[_Kept]] = {}
        # Every parent-child link of every component: when each holds, every path leads to
        # the module it led to at load. Read from the parent's `_modules`, not with
        # `get_submodule`, which walks each path from the top: 85% of a check of FLUX.1's
        # layout went there.
        self._edges: list[_Edge] = []
        self._configs: dict[str, dict] = {}
        for attr in components:
            component = getattr(pipe, attr, None)
            if not isinstance(component, torch.nn.Module):
                continue
            self._components[attr] = component
            if hasattr(component, "register_to_config"):
                self._configs[attr] = dict(component.config)
            self._record(attr, component)
        self._fingerprint = self._sample({})

    def _record(self, attr: str, component: torch.nn.Module) -> None:
        by_path = {"": component}
        for path, module in component.named_modules():
            if isinstance(module, BaseTunerLayer) or ".lora_" in f".{path}":
                continue
            path = path.replace(_WRAPPER_ATTRIBUTE, "")
            by_path[path] = module
            parent_path, _, name = path.rpartition(".")
            parent = by_path.get(parent_path) if path else None
            if parent is not None:
                self._edges.append(_Edge(attr, path, parent, name, module))
            own = module.named_parameters(recurse=False)
            kept = [_Kept.of(module, name, parameter) for name, parameter in own]
            if kept:
                self._parameters[(attr, path)] = kept

    def changes(self, base_values: dict[int, torch.Tensor] | None = None) -> list[str]:
        """What differs from the model as loaded, one line per change (empty: nothing).
        `base_values`: id(parameter) -> the tensor that holds its base values while an
        adapter is fused into it (`AdapterActivation.base_values`)."""
        base_values = base_values or {}
        found = [
            f"{attr} was replaced"
            for attr, component in self._components.items()
            if getattr(self._pipe, attr, None) is not component
        ]
        found += [
            f"{edge.attr}.{edge.path} was replaced"
            for edge in self._edges
            if (held := edge.parent._modules.get(edge.name)) is not edge.child
            and _unwrapped(held) is not edge.child
        ]
        for (attr, path), parameters in self._parameters.items():
            for kept in parameters:
                # `_parameters`, not getattr: Module.__getattr__ is the slow path.
                now = kept.module._parameters.get(kept.name)
                values = base_values.get(id(now), now)
                if now is not kept.parameter or values.shape != kept.shape:
                    found.append(f"{attr}.{path}.{kept.name} was replaced")
                elif values.dtype != kept.dtype:
                    found.append(f"{attr}.{path}.{kept.name} changed dtype")
                elif values.data_ptr() != kept.data_ptr:  # its values now live elsewhere
                    found.append(f"{attr}.{path}.{kept.name} holds other values")
        for attr, config in self._configs.items():
            component = self._components[attr]
            for key, value in config.items():
                if (
                    getattr(component.config, key, value) != value
                    or component.config.get(key) != value
                ):
                    found.append(f"{attr}.config.{key} changed")
        if not found and not _same(self._sample(base_values), self._fingerprint):
            found.append("base weights were overwritten in place")
        return found

    def restore(self) -> list[str]:
        """Put back every replaced component, module, parameter and config value; returns
        what could not be put back (values overwritten in place)."""
        for attr, component in self._components.items():
            if getattr(self._pipe, attr, None) is not component:
                setattr(self._pipe, attr, component)
        for edge in self._edges:
            if _unwrapped(edge.parent._modules.get(edge.name)) is not edge.child:
                _put_back(edge.parent, edge.name, edge.child)
        for parameters in self._parameters.values():
            for kept in parameters:
                if kept.module._parameters.get(kept.name) is not kept.parameter:
                    setattr(kept.module, kept.name, kept.parameter)
        for attr, config in self._configs.items():
            component = self._components[attr]
            changed = {k: v for k, v in config.items() if component.config.get(k) != v}
            if changed:
                component.register_to_config(**changed)
            for key, value in config.items():
                if getattr(component.config, key, value) != value:
                    # diffusers' Flux loader sets the attribute on the config object itself.
                    object.__setattr__(component.config, key, value)
        return self.changes()

    def _sample(self, base_values: dict[int, torch.Tensor]) -> dict[tuple, torch.Tensor]:
        """A few values of every base parameter, gathered into one tensor per device and
        dtype: one copy kernel per group, not a few per parameter (on a GPU each is a launch).
        A parameter's kept view reads its values wherever they are now only while they are
        where they were at load; `changes` checks that first."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for parameters in self._parameters.values():
            for kept in parameters:
                samples = kept.samples
                if samples is None:
                    values = base_values.get(id(kept.parameter), kept.parameter)
                    if values.is_meta or values.numel() == 0:
                        continue
                    samples = _sampled(values)
                groups.setdefault((samples.device, samples.dtype), []).append(samples)
        with torch.no_grad():
            return {key: torch.cat(views) for key, views in groups.items()}


def _sampled(values: torch.Tensor) -> torch.Tensor:
    """SAMPLES_PER_PARAMETER values spread over the tensor (a view where it is contiguous)."""
    flat = values.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES_PER_PARAMETER)
    return flat[::step][:SAMPLES_PER_PARAMETER]


def _unwrapped(module: torch.nn.Module | None) -> torch.nn.Module | None:
    while isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module


def _put_back(parent: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    current = parent._modules.get(name)
    if isinstance(current, BaseTunerLayer) and any(
        len(getattr(current, layer_name, {})) for layer_name in current.adapter_layer_names
    ):
        current.base_layer = module  # other adapters' layers stay around the original
    else:
        setattr(parent, name, module)


def _same(now: dict[tuple, torch.Tensor], then: dict[tuple, torch.Tensor]) -> bool:
    return now.keys() == then.keys() and all(
        torch.equal(_bits(now[key]), _bits(then[key])) for key in now
    )


def _bits(values: torch.Tensor) -> torch.Tensor:
    bits = _BITS.get(values.element_size())
    return values.view(bits) if bits is not None and values.dtype != torch.bool else values
