"""Key renames that bring a LoRA file's names to a layout diffusers' own converters read.

diffusers converts most ecosystem formats itself (`lora_state_dict`); these fill the gaps it
leaves, by renaming keys only (no weight is changed), so the conversion and the alpha / rank
scaling stay diffusers'. Written here because diffusers 0.42 lacks them:

- Flux files in ComfyUI's naming (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`,
  BFL's module names, with lora_down/lora_up or lora_A/lora_B): diffusers' Flux loader reads
  BFL names only under kohya's `lora_unet_` prefix and drops every other key.
- Z-Image files in ComfyUI's naming (`diffusion_model.layers.0.attention.qkv.lora_down.weight`,
  the original model's fused q/k/v): diffusers splits a fused `qkv` LoRA into to_q/to_k/to_v
  only for kohya names (`lora_unet_layers_0_attention_qkv`), and leaves ComfyUI's unconverted.
"""

from __future__ import annotations

import torch

COMFYUI_PREFIX = "diffusion_model."
_PEFT_TO_KOHYA = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def comfyui_to_kohya(
    tensors: dict[str, torch.Tensor], original_names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """`diffusion_model.<module>.<matrix>` -> `lora_unet_<module with _>.<matrix>` for files
    whose modules use the original model's names (a key containing one of `original_names`);
    any other file is returned as it is."""
    if not any(
        key.startswith(COMFYUI_PREFIX) and any(name in key for name in original_names)
        for key in tensors
    ):
        return tensors
    renamed = {}
    for key, tensor in tensors.items():
        if key.startswith(COMFYUI_PREFIX):
            key = _kohya_key(key.removeprefix(COMFYUI_PREFIX))
        renamed[key] = tensor
    return renamed


def _kohya_key(key: str) -> str:
    for peft, kohya in _PEFT_TO_KOHYA.items():
        if key.endswith(peft):
            key = key.removesuffix(peft) + kohya
            break
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        if key.endswith(suffix):
            module = key.removesuffix(suffix)
            return "lora_unet_" + module.replace(".", "_") + suffix
    return key
