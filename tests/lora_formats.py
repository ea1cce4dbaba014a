"""One LoRA written in each ecosystem format of a family, beside the same weights in diffusers keys.

Each format uses the real key names its trainer or tool writes (kohya sd-scripts, musubi-tuner,
ComfyUI, AI Toolkit), over the tiny model's real module shapes. A non-diffusers file keeps lora_up
unscaled and stores alpha; its diffusers twin carries lora_B * alpha / rank, so both must give
the same image once loaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

RANK = 4
ALPHA = 3.0  # alpha != rank, so a loader that ignores alpha gives a visibly different image


@dataclass(frozen=True)
class Module:
    """One LoRA-adapted module as a format names it, and the diffusers modules it covers: more
    than one where the original model fuses them (Flux's and Z-Image's `qkv`)."""

    theirs: str
    parts: tuple[str, ...]
    """Diffusers key stems (`transformer.<module path>`), in the fused matrix's row order."""


def _linear(pipe, stem: str) -> torch.nn.Linear:
    attr, _, path = stem.partition(".")
    module = getattr(pipe, attr).get_submodule(path)
    return getattr(module, "base_layer", module)


def build(
    pipe,
    modules: list[Module],
    style: str,
    seed: int,
    rank: int = RANK,
    alpha: float | None = ALPHA,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the file in `style`, the same LoRA in diffusers keys).

    style `down_up`: `<theirs>.lora_down.weight`, `.lora_up.weight`, `.alpha` (kohya, musubi,
    ComfyUI); `A_B`: `<theirs>.lora_A.weight`, `.lora_B.weight`, and `.alpha` unless alpha is None
    (AI Toolkit). Fused modules share one lora_down, as kohya's trainers write them."""
    generator = torch.Generator().manual_seed(seed)
    scale = 1.0 if alpha is None else alpha / rank
    theirs, diffusers = {}, {}
    for module in modules:
        linears = [_linear(pipe, stem) for stem in module.parts]
        in_features = linears[0].in_features
        down = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        outs = [linear.out_features for linear in linears]
        up = torch.randn(sum(outs), rank, generator=generator) / math.sqrt(rank)
        a, b = ("lora_down", "lora_up") if style == "down_up" else ("lora_A", "lora_B")
        theirs[f"{module.theirs}.{a}.weight"] = down.clone()
        theirs[f"{module.theirs}.{b}.weight"] = up.clone()
        if alpha is not None:
            theirs[f"{module.theirs}.alpha"] = torch.tensor(alpha)
        for stem, rows in zip(module.parts, up.split(outs), strict=True):
            diffusers[f"{stem}.lora_A.weight"] = down.clone()
            diffusers[f"{stem}.lora_B.weight"] = rows * scale
    return theirs, diffusers


def targets(pipe, component: str, endings: tuple[str, ...]) -> list[str]:
    """The diffusers module paths of `component` whose names end with one of `endings`."""
    names = []
    for name, module in getattr(pipe, component).named_modules():
        name = name.removesuffix(".base_layer")  # peft keeps wrapping a layer that held adapters
        if isinstance(module, torch.nn.Linear) and name.endswith(endings):
            names.append(name)
    return list(dict.fromkeys(names))


def kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


# --- Flux: BFL's original module names (double_blocks / single_blocks) --------------------------


def flux_bfl_modules(pipe) -> list[tuple[str, tuple[str, ...]]]:
    """(BFL module path, the diffusers module paths it fuses) for the attention and MLP of every
    double block and the output linear2 of every single block."""
    out = []
    for i in range(len(pipe.transformer.transformer_blocks)):
        ours = f"transformer.transformer_blocks.{i}"
        attn = f"{ours}.attn"
        out += [
            (f"double_blocks.{i}.img_attn.qkv", (f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_v")),
            (f"double_blocks.{i}.img_attn.proj", (f"{attn}.to_out.0",)),
            (
                f"double_blocks.{i}.txt_attn.qkv",
                (f"{attn}.add_q_proj", f"{attn}.add_k_proj", f"{attn}.add_v_proj"),
            ),
            (f"double_blocks.{i}.txt_attn.proj", (f"{attn}.to_add_out",)),
            (f"double_blocks.{i}.img_mlp.0", (f"{ours}.ff.net.0.proj",)),
            (f"double_blocks.{i}.img_mlp.2", (f"{ours}.ff.net.2",)),
        ]
    # Not `single_blocks.{i}.linear1` (q, k, v and the MLP input fused): diffusers splits it at
    # FLUX.1's fixed sizes (3072, 3072, 3072, 12288), which every real Flux file has and the tiny
    # model cannot.
    for i in range(len(pipe.transformer.single_transformer_blocks)):
        ours = f"transformer.single_transformer_blocks.{i}"
        out.append((f"single_blocks.{i}.linear2", (f"{ours}.proj_out",)))
    return out


def flux(pipe, fmt: str, seed: int):
    if fmt in ("diffusers", "ai-toolkit"):
        # AI Toolkit writes Flux LoRAs in diffusers' own names (`transformer.*`, lora_A/lora_B,
        # no alpha): the same layout as diffusers.
        stems = [f"transformer.{p}" for p in targets(pipe, "transformer", _FLUX_TARGETS)]
        return build(pipe, [Module(s, (s,)) for s in stems], "A_B", seed, alpha=None)
    if fmt == "kohya":
        mods = [Module(kohya_name(bfl), parts) for bfl, parts in flux_bfl_modules(pipe)]
        return build(pipe, mods, "down_up", seed)
    if fmt == "comfyui":
        mods = [Module(f"diffusion_model.{bfl}", parts) for bfl, parts in flux_bfl_modules(pipe)]
        return build(pipe, mods, "down_up", seed)
    if fmt == "onetrainer":  # diffusers' module paths with underscores, MLPs included
        paths = targets(pipe, "transformer", _FLUX_TARGETS + ("ff.net.0.proj", "ff.net.2"))
        mods = [
            Module("lora_transformer_" + p.replace(".", "_"), (f"transformer.{p}",)) for p in paths
        ]
        return build(pipe, mods, "down_up", seed)
    if fmt == "comfyui-peft":  # ComfyUI-style BFL names with peft's lora_A/lora_B, no alpha
        mods = [Module(f"diffusion_model.{bfl}", parts) for bfl, parts in flux_bfl_modules(pipe)]
        return build(pipe, mods, "A_B", seed, alpha=None)
    raise ValueError(fmt)


_FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_mlp", "proj_out")


# --- SDXL: kohya's SGM UNet names or diffusers' UNet names, and both CLIP text encoders ---------


def sgm_block(path: str, layers_per_block: int) -> str:
    """kohya's SDXL name (the original SGM UNet's) for a diffusers attention module path:
    input_blocks count conv_in, then each level's layers and its downsampler."""
    step = layers_per_block + 1
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1.{m[3]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"output_blocks.{int(m[1]) * step + int(m[2])}.1.{m[3]}"
    raise ValueError(f"no SGM name for {path}")


def sdxl(pipe, fmt: str, seed: int):
    unet = targets(pipe, "unet", ("to_q", "to_k", "to_v", "to_out.0"))
    if fmt == "diffusers":
        stems = [f"unet.{p}" for p in unet]
        return build(pipe, [Module(s, (s,)) for s in stems], "A_B", seed, alpha=None)
    layers_per_block = pipe.unet.config.layers_per_block
    rename = (lambda p: sgm_block(p, layers_per_block)) if fmt == "kohya" else (lambda p: p)
    mods = [Module(kohya_name(rename(p)), (f"unet.{p}",)) for p in unet]
    for attr, stem in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for path in targets(pipe, attr, ("q_proj", "k_proj", "v_proj", "out_proj")):
            # kohya names CLIP modules under `text_model.`, which transformers 5 dropped
            kohya_path = path if path.startswith("text_model.") else f"text_model.{path}"
            mods.append(Module(stem + kohya_path.replace(".", "_"), (f"{attr}.{path}",)))
    return build(pipe, mods, "down_up", seed)


# --- Wan: the original model's names (musubi-tuner, ComfyUI) ------------------------------------

WAN_ORIGINAL_NAMES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


def wan(pipe, fmt: str, seed: int):
    pairs = [
        (f"blocks.{i}.{theirs}", f"transformer.blocks.{i}.{ours}")
        for i in range(len(pipe.transformer.blocks))
        for theirs, ours in WAN_ORIGINAL_NAMES.items()
    ]
    if fmt == "diffusers":
        return build(pipe, [Module(s, (s,)) for _, s in pairs], "A_B", seed, alpha=None)
    if fmt == "musubi":
        return build(pipe, [Module(kohya_name(o), (s,)) for o, s in pairs], "down_up", seed)
    if fmt == "comfyui":
        mods = [Module(f"diffusion_model.{o}", (s,)) for o, s in pairs]
        return build(pipe, mods, "down_up", seed)
    raise ValueError(fmt)


# --- Qwen-Image (and Edit): diffusers' module names under every trainer's prefix ----------------


def qwen(pipe, fmt: str, seed: int):
    endings = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj")
    paths = targets(pipe, "transformer", endings + ("img_mlp.net.2",))
    if fmt == "diffusers":
        stems = [f"transformer.{p}" for p in paths]
        return build(pipe, [Module(s, (s,)) for s in stems], "A_B", seed, alpha=None)
    if fmt == "kohya":
        mods = [Module(kohya_name(p), (f"transformer.{p}",)) for p in paths]
        return build(pipe, mods, "down_up", seed)
    if fmt == "comfyui":
        mods = [Module(f"diffusion_model.{p}", (f"transformer.{p}",)) for p in paths]
        return build(pipe, mods, "down_up", seed)
    if fmt == "ai-toolkit":
        mods = [Module(f"diffusion_model.{p}", (f"transformer.{p}",)) for p in paths]
        return build(pipe, mods, "A_B", seed)
    raise ValueError(fmt)


# --- Z-Image: the original model fuses q, k and v in `attention.qkv` and calls the output `out` -


def z_image(pipe, fmt: str, seed: int):
    ff = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    attention = [
        name for name, _ in pipe.transformer.named_modules() if name.endswith(".attention")
    ]
    if fmt in ("diffusers", "ai-toolkit"):
        paths = targets(pipe, "transformer", ("to_q", "to_k", "to_v", "to_out.0") + ff)
        if fmt == "diffusers":
            stems = [f"transformer.{p}" for p in paths]
            return build(pipe, [Module(s, (s,)) for s in stems], "A_B", seed, alpha=None)
        mods = [Module(f"diffusion_model.{p}", (f"transformer.{p}",)) for p in paths]
        return build(pipe, mods, "A_B", seed)
    mods = []
    for name in attention:
        ours = f"transformer.{name}"
        mods.append(Module(f"{name}.qkv", tuple(f"{ours}.{p}" for p in ("to_q", "to_k", "to_v"))))
        mods.append(Module(f"{name}.out", (f"{ours}.to_out.0",)))
    for path in targets(pipe, "transformer", ff):
        mods.append(Module(path, (f"transformer.{path}",)))
    if fmt == "kohya":
        mods = [Module(kohya_name(m.theirs), m.parts) for m in mods]
    elif fmt == "comfyui":
        mods = [Module(f"diffusion_model.{m.theirs}", m.parts) for m in mods]
    else:
        raise ValueError(fmt)
    return build(pipe, mods, "down_up", seed)


BUILDERS = {
    "flux": flux,
    "sdxl": sdxl,
    "wan": wan,
    "qwen_image": qwen,
    "qwen_image_edit": qwen,
    "z_image": z_image,
}
# family -> the formats its LoRAs come in, besides diffusers.
FORMATS = {
    "flux": ("kohya", "comfyui", "comfyui-peft", "ai-toolkit", "onetrainer"),
    "sdxl": ("kohya", "kohya-diffusers-names"),
    "wan": ("musubi", "comfyui"),
    "qwen_image": ("kohya", "comfyui", "ai-toolkit"),
    "qwen_image_edit": ("kohya", "comfyui", "ai-toolkit"),
    "z_image": ("kohya", "comfyui", "ai-toolkit"),
}


def lora_in_format(pipe, family: str, fmt: str, seed: int):
    """(the file's tensors in `fmt`, the same LoRA in diffusers keys)."""
    return BUILDERS[family](pipe, fmt, seed)
