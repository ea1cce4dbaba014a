"""Helpers for tests of `PipelineAdapters` inside one process: render a tiny pipeline with a stack
of adapters, build LoRAs, and read back what the adapters' layers hold."""

from __future__ import annotations

import numpy as np
import torch

from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.family import get_family
from deployments.loras.files import parse_lora_file
from tests.family_helpers import fused_qkv_lora, pipeline_output
from tests.lora_files import write_lora

PROMPT = "a red fox in the snow"
SMALL = {"width": 128, "height": 128, "num_inference_steps": 2}
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def image(pipe, seed: int = 0, prompt: str = PROMPT, **kwargs) -> np.ndarray:
    """A small image (SMALL, with `kwargs` over it) as floats in [0, 1]."""
    return pipeline_output(pipe, prompt, seed, **{**SMALL, **kwargs}).images[0]


def with_adapters(adapters, *active: ActiveAdapter) -> np.ndarray:
    adapters.activate(list(active))
    return image(adapters.pipe)


def on(name: str, strength: float = 1.0, clip_strength: float = 1.0) -> ActiveAdapter:
    return ActiveAdapter(name, strength, clip_strength)


def loaded(pipe) -> set[str]:
    """The names of the adapters loaded into any component of `pipe`."""
    return {name for names in pipe.get_list_adapters().values() for name in names}


def from_file(tmp_path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as the service reads them: through a .safetensors file on disk."""
    path = write_lora(tmp_path / "lora.safetensors", tensors)
    tensors, _ = parse_lora_file(path.read_bytes(), path.name)
    return tensors


def kohya_flux(pipe, seed: int, rank: int = 4, alpha: float = 3.0):
    """(kohya sd-scripts tensors, the same LoRA in diffusers keys) for the image attention of
    every double block. kohya fuses q, k and v in one `qkv` matrix and scales by alpha/rank."""
    transformer = pipe.transformer
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    layers = [
        (f"transformer.transformer_blocks.{i}.attn", f"lora_unet_double_blocks_{i}_img_attn")
        for i in range(transformer.config.num_layers)
    ]
    return fused_qkv_lora(layers, dim, "proj", seed, rank, alpha)


def fresh_image(pipe, tensors, *strengths: tuple[float, float], fuse: bool = False):
    """The image of a fresh load of `tensors` into a pipeline holding no other adapter."""
    for name in loaded(pipe):
        pipe.delete_adapters([name])
    adapters = PipelineAdapters(pipe, get_family("flux"), fuse_single=fuse)
    adapters.load("fresh", tensors, "fresh")
    images = [with_adapters(adapters, on("fresh", *strength)) for strength in strengths]
    adapters.delete("fresh")
    return images


def lora_parameters(pipe) -> int:
    return sum(
        p.numel()
        for component in (pipe.transformer, pipe.text_encoder)
        for name, p in component.named_parameters()
        if ".lora_" in name
    )


def adapter_state(adapters, adapter_name: str) -> dict:
    """Everything an adapter's layers compute with: matrices, rank, alpha, scale."""
    state = {}
    for path, module in adapters._find_layers(adapter_name).items():
        for kind in ("lora_A", "lora_B"):
            state[f"{path}.{kind}"] = getattr(module, kind)[adapter_name].weight.detach().clone()
        state[f"{path}.scale"] = (
            module.r[adapter_name],
            module.lora_alpha[adapter_name],
            module.scaling[adapter_name],
            module.use_dora[adapter_name],
        )
    return state


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )
