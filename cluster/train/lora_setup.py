"""The trainable LoRA of a training run: added to the pipeline, read out as a file's tensors,
loaded back from a checkpoint, and its optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import CLIPTextModel

from cluster.train.config import TrainConfig
from deployments.family import Family

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_lora(pipe, family: Family, config: TrainConfig) -> list[str]:
    """Freeze the pipeline and add a trainable LoRA to the denoiser (and the text encoders when
    asked); returns the components that carry it. Seeded, so every worker starts identical."""
    for name in ("vae", family.denoiser_component, *family.text_encoder_components):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    torch.manual_seed(config.seed)
    components = [family.denoiser_component]
    getattr(pipe, family.denoiser_component).add_adapter(
        LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(family.lora_targets))
    )
    if config.train_text_encoder:
        for name in family.text_encoder_components:
            # peft's own injection, which transformers' `add_adapter` wraps: that wrapper refuses
            # peft < 0.22 (transformers 5.24), although serving loads text-encoder LoRAs fine.
            inject_adapter_in_model(
                LoraConfig(
                    r=config.rank,
                    lora_alpha=config.alpha,
                    target_modules=list(TEXT_ENCODER_TARGETS),
                ),
                getattr(pipe, name),
            )
            components.append(name)
    for name in components:
        for param in getattr(pipe, name).parameters():
            if param.requires_grad:
                param.data = param.data.float()  # LoRA weights train in fp32 under any precision
    return components


def _file_prefix(pipe, name: str) -> str:
    """A component's key prefix in the file. CLIP keys keep the `text_model.` level that
    transformers 5 dropped from CLIPTextModel: diffusers (with transformers 4 or 5), ComfyUI
    and kohya's tools all read CLIP LoRAs named that way."""
    component = getattr(pipe, name)
    if isinstance(component, CLIPTextModel) and not hasattr(component, "text_model"):
        return f"{name}.text_model."
    return f"{name}."


def lora_tensors(pipe, components: list[str]) -> dict[str, torch.Tensor]:
    """The LoRA weights in diffusers keys: `<component>.<module>.lora_A.weight`."""
    out = {}
    for name in components:
        prefix = _file_prefix(pipe, name)
        for key, tensor in get_peft_model_state_dict(getattr(pipe, name)).items():
            out[prefix + key] = tensor.detach().to("cpu").float().clone()
    return out


def load_lora_tensors(pipe, components: list[str], tensors: dict[str, torch.Tensor]) -> None:
    for name in components:
        prefix = _file_prefix(pipe, name)
        part = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        set_peft_model_state_dict(getattr(pipe, name), part)


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]):
    lr, decay = config.learning_rate, config.weight_decay
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, weight_decay=decay, relative_step=False, scale_parameter=False
        )
    if config.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=decay)
    if config.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=lr, weight_decay=decay)
    raise ValueError(f"config.optimizer: unknown {config.optimizer!r}")


def make_scheduler(config: TrainConfig, optimizer, total_steps: int):
    """diffusers' schedule for `lr_scheduler`, warmup included: its "constant" ignores
    warmup steps, so a constant schedule with warmup is its "constant_with_warmup"."""
    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=total_steps,
        num_cycles=config.lr_num_cycles,
    )
