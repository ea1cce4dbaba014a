"""Qwen-Image, Z-Image and Wan LoRA files as public trainers write them (see
tests/trainer_layouts.py)."""

from __future__ import annotations

import functools

import torch

from tests.lora_formats import WAN_ORIGINAL_NAMES
from tests.trainer_layouts_base import (
    A_B,
    ALPHA,
    DOWN_UP,
    Layout,
    Target,
    Writer,
    ai_toolkit_metadata,
    kohya,
    kohya_metadata,
    linear_paths,
    lokr,
    lora,
    same_name,
    suffix_match,
)


def _strip(path: str) -> str:
    return path.removeprefix("transformer.")


# --- Qwen-Image (and Qwen-Image-Edit, the same transformer) -------------------------------------


def qwen_block_paths(pipe, mod: bool = True) -> list[str]:
    """Every Linear of the transformer blocks; without the img_mod / txt_mod modulation when
    `mod` is False (musubi-tuner's default exclude pattern `.*(_mod_).*`)."""
    paths = linear_paths(pipe, "transformer", lambda name: name.startswith("transformer_blocks."))
    return [p for p in paths if mod or "_mod." not in p]


def qwen_diffusers(pipe):
    # train_dreambooth_lora_qwen_image.py (diffusers examples/dreambooth): its default targets
    # to_k, to_q, to_v, to_out.0, saved by save_lora_weights under `transformer.`.
    paths = linear_paths(pipe, "transformer", suffix_match(("to_k", "to_q", "to_v", "to_out.0")))
    targets = same_name(paths, lambda path: path)
    return lora(pipe, targets, Writer(31, torch.bfloat16), A_B, alpha=None), {}


def qwen_musubi(pipe, mod: bool = False):
    # musubi-tuner networks/lora_qwen_image.py: QwenImageTransformerBlock's Linear layers as
    # `lora_unet_` + path, modulation excluded unless exclude_mod=False, alpha 0-d, bf16.
    targets = same_name(qwen_block_paths(pipe, mod), lambda p: kohya("lora_unet_", _strip(p)))
    args = {"exclude_mod": str(not mod)}
    tensors = lora(pipe, targets, Writer(32 + mod, torch.bfloat16))
    return tensors, kohya_metadata("networks.lora_qwen_image", "qwen_image", args)


def qwen_ai_toolkit(pipe):
    # ai-toolkit's Qwen-Image model: convert_lora_weights_before_save turns `transformer.` into
    # ComfyUI's `diffusion_model.`; every block Linear, lora_A/lora_B, no alpha, float16.
    targets = same_name(qwen_block_paths(pipe), lambda p: "diffusion_model." + _strip(p))
    tensors = lora(pipe, targets, Writer(34, torch.float16), A_B, alpha=None)
    return tensors, ai_toolkit_metadata("qwen_image_lora")


def qwen_comfyui(pipe):
    # ComfyUI-style: `diffusion_model.` + the diffusers path with kohya's lora_down/lora_up and
    # alpha (diffusers' `_convert_non_diffusers_qwen_lora_to_diffusers` strips the prefix).
    targets = same_name(qwen_block_paths(pipe), lambda p: "diffusion_model." + _strip(p))
    return lora(pipe, targets, Writer(35, torch.bfloat16)), {}


def qwen_lightx2v(pipe):
    # lightx2v's Qwen-Image-Lightning: bare diffusers paths with lora_down/lora_up and alpha.
    targets = same_name(qwen_block_paths(pipe), _strip)
    return lora(pipe, targets, Writer(36, torch.bfloat16)), {}


def _qwen_layouts(family: str) -> list[Layout]:
    builds = [
        ("diffusers", "diffusers train_dreambooth_lora_qwen_image", qwen_diffusers),
        ("musubi", "musubi-tuner", qwen_musubi),
        (
            "musubi-mod",
            "musubi-tuner (exclude_mod=False)",
            functools.partial(qwen_musubi, mod=True),
        ),
        ("ai-toolkit", "ai-toolkit", qwen_ai_toolkit),
        ("comfyui", "ComfyUI", qwen_comfyui),
        ("lightx2v", "lightx2v Qwen-Image-Lightning", qwen_lightx2v),
    ]
    return [Layout(family, name, who, "LoRA", "loads", None, build) for name, who, build in builds]


# --- Z-Image -------------------------------------------------------------------------------------

ZIMAGE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def zimage_main_paths(pipe) -> list[str]:
    """Attention and feed-forward Linear layers of the main `layers` (no refiners)."""
    paths = linear_paths(pipe, "transformer", suffix_match(ZIMAGE_TARGETS))
    return [p for p in paths if p.startswith("transformer.layers.")]


def zimage_diffusers(pipe):
    # diffusers keys: save_lora_weights under `transformer.`, lora_A/lora_B.
    targets = same_name(zimage_main_paths(pipe), lambda path: path)
    return lora(pipe, targets, Writer(41, torch.bfloat16), A_B, alpha=None), {}


def zimage_block_paths(pipe) -> list[str]:
    # ai-toolkit's Z-Image targets ZImageTransformerBlock: every Linear of the main layers and
    # of both refiners, adaLN_modulation included.
    blocks = ("layers.", "noise_refiner.", "context_refiner.")
    return linear_paths(pipe, "transformer", lambda name: name.startswith(blocks))


def zimage_ai_toolkit(pipe):
    # ai-toolkit's Z-Image model saves `diffusion_model.` + the diffusers path, peft format.
    targets = same_name(zimage_block_paths(pipe), lambda p: "diffusion_model." + _strip(p))
    tensors = lora(pipe, targets, Writer(42, torch.float16), A_B, alpha=None)
    return tensors, ai_toolkit_metadata("zimage_lora")


def zimage_ai_toolkit_lokr(pipe):
    # ai-toolkit's Z-Image LoKr, as diffusers' `_convert_non_diffusers_lokr_to_diffusers`
    # documents it: `diffusion_model.layers.0.attention.to_q.lokr_w1` and `.alpha`.
    targets = same_name(zimage_main_paths(pipe), lambda p: "diffusion_model." + _strip(p))
    tensors = lokr(pipe, targets, Writer(43, torch.float16), factor=16)
    return tensors, ai_toolkit_metadata("zimage_lokr")


def zimage_original(pipe, name) -> list[Target]:
    """The original model's names: q, k and v fused as `attention.qkv`, the output
    `attention.out`, feed_forward as is; each named in the file by `name(original path)`."""
    targets = []
    for i in range(len(pipe.transformer.layers)):
        ours = f"transformer.layers.{i}"
        qkv = tuple(f"{ours}.attention.{p}" for p in ("to_q", "to_k", "to_v"))
        targets.append(Target(name(f"layers.{i}.attention.qkv"), qkv))
        targets.append(Target(name(f"layers.{i}.attention.out"), (f"{ours}.attention.to_out.0",)))
        for w in ("w1", "w2", "w3"):
            path = f"layers.{i}.feed_forward.{w}"
            targets.append(Target(name(path), (f"transformer.{path}",)))
    return targets


def zimage_comfyui(pipe):
    # ComfyUI's Z-Image names (the original model's fused qkv) under `diffusion_model.`.
    targets = zimage_original(pipe, lambda path: "diffusion_model." + path)
    return lora(pipe, targets, Writer(44, torch.bfloat16)), {}


def zimage_musubi(pipe):
    # musubi-tuner networks/lora_zimage.py: ZImageTransformerBlock Linear layers as
    # `lora_unet_` + the diffusers path; `_modulation` and `_refiner` excluded by default.
    targets = same_name(zimage_main_paths(pipe), lambda p: kohya("lora_unet_", _strip(p)))
    tensors = lora(pipe, targets, Writer(45, torch.bfloat16))
    return tensors, kohya_metadata("networks.lora_zimage", "z_image")


def zimage_musubi_comfy(pipe):
    # musubi-tuner's convert_z_image_lora_to_comfy.py output: still `lora_unet_`, but q, k, v
    # fused into `attention_qkv` (alpha times 3) and to_out_0 renamed `attention_out`.
    targets = zimage_original(pipe, lambda path: kohya("lora_unet_", path))
    writer = Writer(46, torch.bfloat16)
    lora(pipe, targets, writer)
    for key in [k for k in writer.tensors if k.endswith("attention_qkv.alpha")]:
        writer.scalar(key, 3 * ALPHA)
    return writer.tensors, kohya_metadata("networks.lora_zimage", "z_image")


def _zimage_layouts() -> list[Layout]:
    builds = [
        ("diffusers", "diffusers", "LoRA", zimage_diffusers),
        ("ai-toolkit", "ai-toolkit", "LoRA", zimage_ai_toolkit),
        ("ai-toolkit-lokr", "ai-toolkit", "LoKr", zimage_ai_toolkit_lokr),
        ("comfyui", "ComfyUI", "LoRA", zimage_comfyui),
        ("musubi", "musubi-tuner", "LoRA", zimage_musubi),
        ("musubi-comfy", "musubi-tuner convert_z_image_lora_to_comfy", "LoRA", zimage_musubi_comfy),
    ]
    return [Layout("z_image", n, who, kind, "loads", None, b) for n, who, kind, b in builds]


# --- Wan -----------------------------------------------------------------------------------------

# The original Wan model's module names in a block -> diffusers' (musubi-tuner, ComfyUI and
# ai-toolkit's convert_to_original use the former).
WAN_NAMES = WAN_ORIGINAL_NAMES


def wan_targets(pipe, name) -> list[Target]:
    """Attention and feed-forward of every block, named `name(original path)` in the file."""
    return [
        Target(name(f"blocks.{i}.{theirs}"), (f"transformer.blocks.{i}.{ours}",))
        for i in range(len(pipe.transformer.blocks))
        for theirs, ours in WAN_NAMES.items()
    ]


def wan_musubi(pipe):
    # musubi-tuner networks/lora_wan.py: WanAttentionBlock's Linear layers (norms, embeddings
    # and head excluded) as `lora_unet_blocks_{i}_self_attn_q` and the like, bf16, 0-d alpha.
    targets = wan_targets(pipe, lambda path: kohya("lora_unet_", path))
    tensors = lora(pipe, targets, Writer(51, torch.bfloat16))
    return tensors, kohya_metadata("networks.lora_wan", "wan")


def wan_diffusers(pipe):
    # diffusers keys: `transformer.blocks.{i}.attn1.to_q` and the like, lora_A/lora_B.
    targets = [Target(t.parts[0], t.parts) for t in wan_targets(pipe, lambda path: path)]
    return lora(pipe, targets, Writer(52, torch.bfloat16), A_B, alpha=None), {}


def wan_ai_toolkit(pipe):
    # ai-toolkit's Wan 2.1 model saves through convert_to_original: `diffusion_model.` + the
    # original names, peft's lora_A/lora_B, no alpha, float16.
    targets = wan_targets(pipe, lambda path: "diffusion_model." + path)
    tensors = lora(pipe, targets, Writer(53, torch.float16), A_B, alpha=None)
    return tensors, ai_toolkit_metadata("wan21_lora")


def wan_comfyui(pipe):
    # ComfyUI's own naming (and lightx2v's published Wan LoRAs): lora_down/lora_up with alpha.
    targets = wan_targets(pipe, lambda path: "diffusion_model." + path)
    return lora(pipe, targets, Writer(54, torch.bfloat16), DOWN_UP), {}


def _wan_layouts() -> list[Layout]:
    builds = [
        ("musubi", "musubi-tuner", wan_musubi),
        ("diffusers", "diffusers", wan_diffusers),
        ("ai-toolkit", "ai-toolkit / ComfyUI", wan_ai_toolkit),
        ("comfyui", "ComfyUI / lightx2v", wan_comfyui),
    ]
    return [Layout("wan", name, who, "LoRA", "loads", None, b) for name, who, b in builds]


LAYOUTS = (
    _qwen_layouts("qwen_image")
    + _qwen_layouts("qwen_image_edit")
    + _zimage_layouts()
    + _wan_layouts()
)
