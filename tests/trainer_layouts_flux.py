"""FLUX.1 LoRA files as public trainers write them (see tests/trainer_layouts.py)."""

from __future__ import annotations

import functools

import torch

from tests.trainer_layouts_base import (
    A_B,
    ALPHA,
    Layout,
    Target,
    Writer,
    ai_toolkit_metadata,
    clip_targets,
    diffusers_metadata,
    kohya,
    kohya_metadata,
    linear_paths,
    loha,
    lokr,
    lora,
    module_at,
    same_name,
    suffix_match,
)

# BFL's module names in a double block -> diffusers' modules they cover, as diffusers' own
# converter (`_convert_bfl_flux_control_lora_to_diffusers`) and OneTrainer's
# (modules/util/convert/lora/convert_flux_lora.py) pair them.
DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
# Outside the blocks, for the BFL control LoRAs that adapt every Linear of the model.
OUTER = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
# train_dreambooth_lora_flux.py's default `target_modules` (diffusers examples/dreambooth).
DIFFUSERS_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


def bfl_targets(pipe, name=lambda bfl: bfl) -> list[Target]:
    """Every Linear of every double and single block, in BFL's names (what sd-scripts'
    networks/lora_flux.py adapts by default: all Linear children of DoubleStreamBlock and
    SingleStreamBlock), each named in the file by `name(bfl path)`."""
    transformer = pipe.transformer
    targets = []
    for i in range(len(transformer.transformer_blocks)):
        ours = f"transformer.transformer_blocks.{i}"
        for bfl, parts in DOUBLE.items():
            targets.append(Target(name(f"double_blocks.{i}.{bfl}"), _under(ours, parts)))
    for i in range(len(transformer.single_transformer_blocks)):
        ours = f"transformer.single_transformer_blocks.{i}"
        for bfl, parts in SINGLE.items():
            targets.append(Target(name(f"single_blocks.{i}.{bfl}"), _under(ours, parts)))
    return targets


def _under(stem: str, parts: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{stem}.{part}" for part in parts)


def kohya_unet(pipe) -> list[Target]:
    return bfl_targets(pipe, lambda bfl: kohya("lora_unet_", bfl))


def kohya_clip(pipe) -> list[Target]:
    # CLIPAttention and CLIPMLP, the Linear layers sd-scripts adapts in CLIP-L, as lora_te1.
    return clip_targets(pipe, "text_encoder", lambda path: kohya("lora_te1_", path))


def diffusers_paths(pipe) -> list[str]:
    return linear_paths(pipe, "transformer", suffix_match(DIFFUSERS_TARGETS))


# --- the layouts ---------------------------------------------------------------------------------


def diffusers_dreambooth(pipe):
    # train_dreambooth_lora_flux.py: peft on its default targets, saved by
    # FluxPipeline.save_lora_weights with the LoraConfig as `lora_adapter_metadata`; run with
    # --lora_alpha 8 (twice the rank) so the loader must fold that alpha in.
    targets = same_name(diffusers_paths(pipe), lambda path: path)
    tensors = lora(pipe, targets, Writer(1, torch.bfloat16), A_B, alpha=None)
    return tensors, diffusers_metadata("transformer", list(DIFFUSERS_TARGETS), alpha=8.0)


def diffusers_lora_bias(pipe):
    # peft's LoraConfig(lora_bias=True) gives lora_B a bias, saved as `lora_B.bias` (out,).
    targets = same_name(diffusers_paths(pipe), lambda path: path)
    return lora(pipe, targets, Writer(2, torch.bfloat16), A_B, alpha=None, bias=True), {}


def diffusers_dora(pipe):
    # peft's DoRA (use_dora=True) saves a `lora_magnitude_vector` of shape (out,) per layer
    # (peft utils/save_and_load.py drops its `.weight`); diffusers prefixes the component.
    writer = Writer(3, torch.bfloat16)
    paths = diffusers_paths(pipe)
    lora(pipe, same_name(paths, lambda path: path), writer, A_B, alpha=None)
    for path in paths:
        writer.rand(f"{path}.lora_magnitude_vector", module_at(pipe, path).out_features)
    return writer.tensors, {}


def peft_saved(pipe):
    # PeftModel.save_pretrained's adapter_model.safetensors: `base_model.model.` + the module
    # path, alpha only in adapter_config.json beside it.
    targets = same_name(
        diffusers_paths(pipe), lambda path: "base_model.model." + path.removeprefix("transformer.")
    )
    return lora(pipe, targets, Writer(4), A_B, alpha=None), {"format": "pt"}


def kohya_flux(pipe):
    # sd-scripts networks/lora_flux.py: prefix lora_unet, alpha a 0-d buffer, all saved in the
    # --save_precision its Flux guide uses (bf16).
    tensors = lora(pipe, kohya_unet(pipe), Writer(5, torch.bfloat16))
    return tensors, kohya_metadata("networks.lora_flux", "flux1")


def kohya_flux_clip(pipe):
    # The same with --network_train_text_encoder: CLIP-L under lora_te1.
    writer = Writer(6, torch.bfloat16)
    lora(pipe, kohya_unet(pipe) + kohya_clip(pipe), writer)
    return writer.tensors, kohya_metadata("networks.lora_flux", "flux1")


def comfyui_bfl(pipe, names=A_B, alpha=None, seed=7):
    # BFL's module names under ComfyUI's `diffusion_model.` prefix, in peft's lora_A/lora_B
    # (the variant diffusers PR #10985 added) or kohya's lora_down/lora_up.
    targets = bfl_targets(pipe, lambda bfl: "diffusion_model." + bfl)
    return lora(pipe, targets, Writer(seed, torch.bfloat16), names, alpha=alpha), {}


def ai_toolkit(pipe):
    # ai-toolkit (toolkit/network_mixins.py, peft format): every Linear of both block types
    # under `transformer.`, lora_A/lora_B, no alpha, float16 (its default save dtype).
    paths = linear_paths(pipe, "transformer", lambda name: "transformer_blocks." in name)
    targets = same_name(paths, lambda path: path)
    tensors = lora(pipe, targets, Writer(8, torch.float16), A_B, alpha=None)
    return tensors, ai_toolkit_metadata("flux_lora")


def ai_toolkit_lokr(pipe):
    # ai-toolkit's LoKr: its `lora_transformer_` names become `lycoris_` on save
    # (network_mixins.py get_state_dict), over the same modules as its LoRA.
    paths = linear_paths(pipe, "transformer", lambda name: "transformer_blocks." in name)
    targets = same_name(paths, lambda path: kohya("lycoris_", path.removeprefix("transformer.")))
    return lokr(pipe, targets, Writer(9, torch.float16), factor=16), ai_toolkit_metadata("lokr")


def onetrainer_paths(pipe) -> list[str]:
    # OneTrainer's Flux "attn-mlp" layer preset: module paths containing "attn" or "ff.net".
    return linear_paths(pipe, "transformer", lambda name: "attn" in name or "ff.net" in name)


def onetrainer(pipe, t5=False, dora=False, seed=10):
    # OneTrainer's default (legacy) save: convert_to_legacy_diffusers gives `lora_transformer_`
    # + the diffusers path with `_`, `lora_te1_` for CLIP-L and `lora_te2_` for T5, a 0-d alpha.
    writer = Writer(seed)
    targets = same_name(onetrainer_paths(pipe), lambda path: kohya("lora_", path))
    if t5:
        t5_paths = linear_paths(pipe, "text_encoder_2", lambda name: True)
        targets += same_name(
            t5_paths, lambda path: kohya("lora_te2_", path.removeprefix("text_encoder_2."))
        )
    else:
        targets += kohya_clip(pipe)
    lora(pipe, targets, writer)
    if dora:
        # OneTrainer's DoRAModule keeps the magnitude over the input axis by default
        # (lora_decompose_output_axis off): norm over dim 0 of W (out, in), kept as (1, in).
        for target in targets:
            in_features = module_at(pipe, target.parts[0]).in_features
            writer.rand(target.key + ".dora_scale", 1, in_features)
    return writer.tensors, {}


def xlabs(pipe, single=False):
    # x-flux train_flux_lora_deepspeed.py: DoubleStreamBlockLoraProcessor (qkv_lora1/proj_lora1
    # on the image stream, qkv_lora2/proj_lora2 on the text stream) and, in its newer default,
    # SingleStreamBlockLoraProcessor (qkv_lora, proj_lora over linear2's 15360 inputs); each a
    # LoRALinearLayer with `down` and `up`, saved float32 without alpha.
    transformer = pipe.transformer
    targets = []
    for i in range(len(transformer.transformer_blocks)):
        ours = f"transformer.transformer_blocks.{i}"
        stem = f"double_blocks.{i}.processor"
        for mine, bfl in (("qkv_lora1", "img_attn.qkv"), ("proj_lora1", "img_attn.proj")):
            targets.append(Target(f"{stem}.{mine}", _under(ours, DOUBLE[bfl])))
        for mine, bfl in (("qkv_lora2", "txt_attn.qkv"), ("proj_lora2", "txt_attn.proj")):
            targets.append(Target(f"{stem}.{mine}", _under(ours, DOUBLE[bfl])))
    if single:
        for i in range(len(transformer.single_transformer_blocks)):
            ours = f"transformer.single_transformer_blocks.{i}"
            stem = f"single_blocks.{i}.processor"
            qkv = ("attn.to_q", "attn.to_k", "attn.to_v")
            targets.append(Target(f"{stem}.qkv_lora", _under(ours, qkv)))
            targets.append(Target(f"{stem}.proj_lora", _under(ours, ("proj_out",))))
    names = (".down.weight", ".up.weight")
    return lora(pipe, targets, Writer(11), names, alpha=None), {}


def lycoris(pipe, algo: str):
    # LyCORIS through sd-scripts (--network_module lycoris.kohya): kohya's lora_unet names.
    write = lokr if algo == "lokr" else loha
    tensors = write(pipe, kohya_unet(pipe), Writer(12, torch.bfloat16))
    args = {"algo": algo, "factor": "-1", "preset": "full"}
    return tensors, kohya_metadata("lycoris.kohya", "flux1", args)


def control_lora(pipe, bias=False):
    # diffusers examples/flux-control/train_control_lora_flux.py: x_embedder widened to twice
    # its inputs (image and control latents) before peft adds LoRA to it and its default
    # targets; `--use_lora_bias` sets LoraConfig(lora_bias=True), which saves lora_B.bias.
    x_embedder = pipe.transformer.x_embedder
    targets = [
        Target("transformer.x_embedder", ("transformer.x_embedder",), 2 * x_embedder.in_features)
    ]
    targets += same_name(diffusers_paths(pipe), lambda path: path)
    return lora(pipe, targets, Writer(13, torch.bfloat16), A_B, alpha=None, bias=bias), {}


def bfl_control(pipe):
    # BFL's FLUX.1-Depth-dev-lora: every Linear in BFL's names with lora_A, lora_B and
    # lora_B.bias, img_in twice as wide, and the attention norms' scales (the keys diffusers'
    # `_convert_bfl_flux_control_lora_to_diffusers` pops).
    writer = Writer(14, torch.bfloat16)
    x_embedder = pipe.transformer.x_embedder
    targets = [Target("img_in", ("transformer.x_embedder",), 2 * x_embedder.in_features)]
    targets += [Target(bfl, ("transformer." + ours,)) for bfl, ours in OUTER.items()]
    targets += bfl_targets(pipe)
    lora(pipe, targets, writer, A_B, alpha=None, bias=True)
    head = pipe.transformer.transformer_blocks[0].attn.norm_q.weight.shape[0]
    for i in range(len(pipe.transformer.transformer_blocks)):
        for stream in ("img_attn", "txt_attn"):
            for norm in ("query_norm", "key_norm"):
                writer.rand(f"double_blocks.{i}.{stream}.norm.{norm}.scale", head)
    for i in range(len(pipe.transformer.single_transformer_blocks)):
        for norm in ("query_norm", "key_norm"):
            writer.rand(f"single_blocks.{i}.norm.{norm}.scale", head)
    return writer.tensors, {}


def sdxl_kohya_file(pipe):
    # An SDXL file sent to the Flux endpoint: made on SDXL's own shapes.
    from tests.real_models import meta_pipeline
    from tests.trainer_layouts_sdxl import kohya_sdxl

    return kohya_sdxl(meta_pipeline("sdxl"))


def _layout(name, trainer, kind, build, expect="loads", reason=None) -> Layout:
    return Layout("flux", name, trainer, kind, expect, reason, build)


LAYOUTS = [
    _layout("diffusers", "diffusers train_dreambooth_lora_flux", "LoRA", diffusers_dreambooth),
    _layout("kohya", "kohya sd-scripts", "LoRA", kohya_flux),
    _layout("kohya-clip", "kohya sd-scripts", "LoRA", kohya_flux_clip),
    _layout("ai-toolkit", "ai-toolkit", "LoRA", ai_toolkit),
    _layout("onetrainer", "OneTrainer", "LoRA", onetrainer),
    _layout(
        "onetrainer-t5",
        "OneTrainer",
        "LoRA",
        functools.partial(onetrainer, t5=True, seed=15),
        "refused",
        "t5",
    ),
    _layout(
        "onetrainer-dora",
        "OneTrainer",
        "DoRA",
        functools.partial(onetrainer, dora=True, seed=16),
        "refused",
        "dora adapters are not supported",
    ),
    _layout("xlabs", "XLabs x-flux", "LoRA", xlabs),
    _layout("xlabs-single", "XLabs x-flux", "LoRA", functools.partial(xlabs, single=True)),
    _layout(
        "lycoris-lokr", "LyCORIS (sd-scripts)", "LoKr", functools.partial(lycoris, algo="lokr")
    ),
    _layout(
        "lycoris-loha", "LyCORIS (sd-scripts)", "LoHa", functools.partial(lycoris, algo="loha")
    ),
    _layout("ai-toolkit-lokr", "ai-toolkit", "LoKr", ai_toolkit_lokr),
    _layout(
        "control-lora",
        "diffusers train_control_lora_flux",
        "Control",
        control_lora,
        "refused",
        "control lora",
    ),
    _layout(
        "control-lora-bias",
        "diffusers train_control_lora_flux",
        "Control",
        functools.partial(control_lora, bias=True),
        "refused",
        "control lora",
    ),
    _layout(
        "bfl-depth-lora",
        "BFL FLUX.1-Depth-dev-lora",
        "Control",
        bfl_control,
        "refused",
        "control lora",
    ),
    _layout("peft", "peft save_pretrained", "LoRA", peft_saved),
    _layout("diffusers-lora-bias", "peft lora_bias", "LoRA", diffusers_lora_bias),
    _layout("diffusers-dora", "peft DoRA (diffusers keys)", "DoRA", diffusers_dora),
    _layout("comfyui-peft", "ComfyUI / AI-Toolkit (BFL names)", "LoRA", comfyui_bfl),
    _layout(
        "comfyui",
        "ComfyUI (BFL names)",
        "LoRA",
        functools.partial(comfyui_bfl, names=(".lora_down.weight", ".lora_up.weight"), alpha=ALPHA),
    ),
    _layout("sdxl-kohya", "kohya sd-scripts (SDXL)", "LoRA", sdxl_kohya_file, "refused", "sdxl"),
]
