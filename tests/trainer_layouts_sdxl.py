"""SDXL LoRA files as public trainers write them (see tests/trainer_layouts.py)."""

from __future__ import annotations

import functools
import re

import torch

from tests.trainer_layouts_base import (
    A_B,
    Layout,
    Target,
    Writer,
    clip_targets,
    kohya,
    kohya_metadata,
    loha,
    lokr,
    lora,
    same_name,
    suffix_match,
)

# The modules of a diffusers ResnetBlock2D as the original SGM UNet (and so kohya's
# sdxl_original_unet.py) names them; OneTrainer's convert_sdxl_lora.py pairs them the same way.
RESNET_NAMES = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# train_dreambooth_lora_sdxl.py's targets (diffusers examples/dreambooth).
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def sgm_path(path: str, unet) -> str:
    """The SGM UNet's name for a diffusers UNet module path. input_blocks count conv_in, then
    each level's resnets (with their attentions as sub-block 1) and its downsampler;
    output_blocks hold each level's layers_per_block + 1 resnets, the upsampler last."""
    step = unet.config.layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        index = 1 + int(m[1]) * step + int(m[3])
        return f"input_blocks.{index}.{_sub(m[2], m[4])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"middle_block.{index}.{_resnet(m[3]) if m[1] == 'resnets' else m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        return f"output_blocks.{int(m[1]) * step + int(m[3])}.{_sub(m[2], m[4])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        block = unet.up_blocks[int(m[1])]
        position = 2 if getattr(block, "attentions", None) else 1
        return f"output_blocks.{int(m[1]) * step + step - 1}.{position}.conv"
    raise ValueError(f"no SGM name for {path}")


def _sub(kind: str, rest: str) -> str:
    return f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"


def _resnet(rest: str) -> str:
    return RESNET_NAMES.get(rest, rest)


def unet_paths(pipe, keep) -> list[str]:
    """`unet.<path>` of the UNet's Linear and Conv2d layers whose path `keep` accepts."""
    return [
        f"unet.{name}"
        for name, module in pipe.unet.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and keep(name)
    ]


def attention_paths(pipe) -> list[str]:
    # What sd-scripts' networks/lora.py adapts by default: every Linear (and 1x1 conv) inside
    # a Transformer2DModel, proj_in and proj_out included (Linear in SDXL).
    return unet_paths(pipe, lambda name: ".attentions." in name)


def locon_paths(pipe) -> list[str]:
    # With --network_args conv_dim=..., sd-scripts also adapts ResnetBlock2D, Downsample2D and
    # Upsample2D: their 3x3 convs, the time embedding Linear and the 1x1 shortcut.
    def keep(name: str) -> bool:
        resnet = re.search(r"\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)$", name)
        return bool(resnet) or re.search(r"(down|up)samplers\.0\.conv$", name) is not None

    return attention_paths(pipe) + unet_paths(pipe, keep)


def kohya_unet(pipe, paths: list[str]) -> list[Target]:
    unet = pipe.unet
    return same_name(
        paths, lambda path: kohya("lora_unet_", sgm_path(path.removeprefix("unet."), unet))
    )


def kohya_text(pipe) -> list[Target]:
    # CLIPAttention and CLIPMLP of both encoders, as lora_te1 (CLIP-L) and lora_te2 (bigG).
    te1 = clip_targets(pipe, "text_encoder", lambda path: kohya("lora_te1_", path))
    return te1 + clip_targets(pipe, "text_encoder_2", lambda path: kohya("lora_te2_", path))


# --- the layouts ---------------------------------------------------------------------------------


def kohya_sdxl(pipe):
    # sd-scripts sdxl_train_network.py with networks/lora.py, UNet and both text encoders,
    # float32 (no --save_precision), alpha a 0-d buffer.
    targets = kohya_unet(pipe, attention_paths(pipe)) + kohya_text(pipe)
    return lora(pipe, targets, Writer(21)), kohya_metadata("networks.lora", "sdxl_base_v1-0")


def kohya_locon(pipe):
    # The same with conv_dim (LoCon): 3x3 lora_down (r, in, 3, 3) and 1x1 lora_up, saved fp16.
    targets = kohya_unet(pipe, locon_paths(pipe))
    tensors = lora(pipe, targets, Writer(22, torch.float16))
    args = {"conv_dim": "4", "conv_alpha": "2"}
    return tensors, kohya_metadata("networks.lora", "sdxl_base_v1-0", args)


def diffusers_dreambooth(pipe):
    # train_dreambooth_lora_sdxl.py saves convert_state_dict_to_diffusers(peft state dicts):
    # `unet.<path>.lora.down.weight` for the UNet and `lora_linear_layer.down` for the encoders.
    unet = same_name(unet_paths(pipe, suffix_match(UNET_TARGETS)), lambda path: path)
    writer = Writer(23)
    lora(pipe, unet, writer, (".lora.down.weight", ".lora.up.weight"), alpha=None)
    for attr in ("text_encoder", "text_encoder_2"):
        text = clip_targets(pipe, attr, lambda path, attr=attr: f"{attr}.{path}", TEXT_TARGETS)
        names = (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")
        lora(pipe, text, writer, names, alpha=None)
    return writer.tensors, {}


def diffusers_peft(pipe):
    # save_lora_weights given peft state dicts directly (train_text_to_image_lora_sdxl.py):
    # lora_A/lora_B under `unet.`, `text_encoder.` and `text_encoder_2.`.
    writer = Writer(24)
    targets = same_name(unet_paths(pipe, suffix_match(UNET_TARGETS)), lambda path: path)
    for attr in ("text_encoder", "text_encoder_2"):
        targets += clip_targets(pipe, attr, lambda p, attr=attr: f"{attr}.{p}", TEXT_TARGETS)
    return lora(pipe, targets, writer, A_B, alpha=None), {}


def onetrainer(pipe):
    # OneTrainer's SDXL "attn-mlp" preset (module paths containing "attentions") saved legacy:
    # `lora_unet_` + the diffusers path, and every Linear of both encoders (text_projection of
    # bigG included) as lora_te1_ / lora_te2_.
    targets = same_name(attention_paths(pipe), lambda path: kohya("lora_", path))
    for attr, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        targets += clip_targets(pipe, attr, lambda p, prefix=prefix: kohya(prefix, p), None)
    return lora(pipe, targets, Writer(25)), {}


def lycoris(pipe, algo: str):
    # LyCORIS through sd-scripts (lycoris.kohya) on the attention Linear layers and both text
    # encoders, kohya's SGM names.
    targets = kohya_unet(pipe, attention_paths(pipe)) + kohya_text(pipe)
    write = lokr if algo == "lokr" else loha
    tensors = write(pipe, targets, Writer(26, torch.float16))
    args = {"algo": algo, "factor": "-1", "preset": "attn-mlp"}
    return tensors, kohya_metadata("lycoris.kohya", "sdxl_base_v1-0", args)


def peft_saved(pipe):
    # PeftModel.save_pretrained on the UNet: `base_model.model.` + the module path.
    paths = unet_paths(pipe, suffix_match(UNET_TARGETS))
    targets = same_name(paths, lambda path: "base_model.model." + path.removeprefix("unet."))
    return lora(pipe, targets, Writer(27), A_B, alpha=None), {"format": "pt"}


def flux_kohya_file(pipe):
    # A Flux file sent to the SDXL endpoint: made on Flux's own shapes.
    from tests.real_models import meta_pipeline
    from tests.trainer_layouts_flux import kohya_flux

    return kohya_flux(meta_pipeline("flux"))


def _layout(name, trainer, kind, build, expect="loads", reason=None) -> Layout:
    return Layout("sdxl", name, trainer, kind, expect, reason, build)


LAYOUTS = [
    _layout("kohya", "kohya sd-scripts", "LoRA", kohya_sdxl),
    _layout("kohya-locon", "kohya sd-scripts (conv_dim)", "LoRA", kohya_locon),
    _layout("diffusers", "diffusers train_dreambooth_lora_sdxl", "LoRA", diffusers_dreambooth),
    _layout("diffusers-peft", "diffusers (peft keys)", "LoRA", diffusers_peft),
    _layout("onetrainer", "OneTrainer", "LoRA", onetrainer),
    _layout(
        "lycoris-lokr", "LyCORIS (sd-scripts)", "LoKr", functools.partial(lycoris, algo="lokr")
    ),
    _layout(
        "lycoris-loha", "LyCORIS (sd-scripts)", "LoHa", functools.partial(lycoris, algo="loha")
    ),
    _layout("peft", "peft save_pretrained", "LoRA", peft_saved),
    _layout("flux-kohya", "kohya sd-scripts (Flux)", "LoRA", flux_kohya_file, "refused", "flux"),
]
