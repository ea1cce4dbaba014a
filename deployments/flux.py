"""FLUX.1 family: FluxPipeline, served at /flux and /flux-lora."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.models.normalization import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
)

from deployments.blocks import numbered_blocks
from deployments.family import Family, TrainingSpec
from deployments.lora_keys import comfyui_to_kohya
from deployments.schemas import GenerationDefaults, GenerationJob
from deployments.tiny import (
    tiny_clip_text_model,
    tiny_clip_tokenizer,
    tiny_latent_vae,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)
from deployments.training_calls import vae_encode

_TINY_SEED = 0
_TINY_TEXT_DIM = 32
_TINY_LATENT_CHANNELS = 4
# At default init the AdaLN gates come out near 0.15, so attention barely reaches the output and
# neither the prompt nor an attention LoRA visibly changes the image; 8x makes both show.
_TINY_MODULATION_GAIN = 8.0


def _tiny_transformer() -> FluxTransformer2DModel:
    torch.manual_seed(_TINY_SEED)
    model = FluxTransformer2DModel(
        patch_size=1,
        # Flux packs 2x2 latent patches into the token channels.
        in_channels=4 * _TINY_LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TINY_TEXT_DIM,
        pooled_projection_dim=_TINY_TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    adaln = (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, adaln):
                module.linear.weight.mul_(_TINY_MODULATION_GAIN)
                module.linear.bias.mul_(_TINY_MODULATION_GAIN)
    return model


def _tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1-dev's settings, so the resolution-dependent timestep shift is exercised.
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_tiny_flux() -> FluxPipeline:
    """Randomly initialised FLUX.1-dev-shaped pipeline, identical on every call."""
    return FluxPipeline(
        scheduler=_tiny_scheduler(),
        vae=tiny_latent_vae(_TINY_LATENT_CHANNELS, layers_per_block=1, seed=_TINY_SEED),
        text_encoder=tiny_clip_text_model(hidden_size=_TINY_TEXT_DIM, seed=_TINY_SEED),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(d_model=_TINY_TEXT_DIM, seed=_TINY_SEED),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=_tiny_transformer(),
    )


def pipeline_kwargs(job: GenerationJob) -> dict[str, Any]:
    """FLUX.1-dev's guidance is distilled (`guidance_scale` is an input of the model). A
    negative prompt needs true classifier-free guidance, which doubles the work: it is turned
    on, at the same scale, only when a negative prompt is given."""
    kwargs: dict[str, Any] = {
        "prompt": job.prompt,
        "width": job.width,
        "height": job.height,
        "num_inference_steps": job.steps,
        "guidance_scale": job.cfg,
    }
    if job.negative_prompt:
        kwargs["negative_prompt"] = job.negative_prompt
        kwargs["true_cfg_scale"] = job.cfg
    return kwargs


# --- Training -----------------------------------------------------------------------------------

_TRAIN_MAX_SEQUENCE_LENGTH = 512  # T5 tokens, as the pipeline encodes prompts by default
# FLUX.1-dev's guidance is an input of the distilled model; LoRA trainers feed it 1.0.
_TRAIN_GUIDANCE = 1.0


def _encode_prompts(pipe, captions: list[str]) -> list[dict[str, Any]]:
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=captions,
        prompt_2=None,
        device=pipe.transformer.device,
        max_sequence_length=_TRAIN_MAX_SEQUENCE_LENGTH,
    )
    return [
        {"prompt_embeds": prompt_embeds[i], "pooled": pooled[i], "text_ids": text_ids}
        for i in range(len(captions))
    ]


def _predict(pipe, noisy: torch.Tensor, sigmas: torch.Tensor, conds: list[dict]) -> torch.Tensor:
    """The transformer's velocity for BCHW latents: packed into 2x2 patches and back."""
    batch, channels, height, width = noisy.shape
    packed = pipe._pack_latents(noisy, batch, channels, height, width)
    image_ids = pipe._prepare_latent_image_ids(
        batch, height // 2, width // 2, noisy.device, noisy.dtype
    )
    transformer = pipe.transformer
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((batch,), _TRAIN_GUIDANCE, device=noisy.device)
    out = transformer(
        hidden_states=packed,
        timestep=sigmas,  # the transformer scales by 1000 itself, as the pipeline relies on
        guidance=guidance,
        pooled_projections=torch.stack([c["pooled"] for c in conds]),
        encoder_hidden_states=torch.stack([c["prompt_embeds"] for c in conds]),
        txt_ids=conds[0]["text_ids"],
        img_ids=image_ids,
        return_dict=False,
    )[0]
    scale = pipe.vae_scale_factor
    return pipe._unpack_latents(out, height * scale, width * scale, scale)


TRAINING = TrainingSpec(
    objective="flow_matching",
    encode_images=vae_encode,
    encode_prompts=_encode_prompts,
    predict=_predict,
    # The diffusers-named kohya layout (`lora_transformer_transformer_blocks_0_attn_to_q`), which
    # diffusers reads for Flux; BFL's fused names cannot split the tiny model's single blocks.
    kohya_prefix="lora_transformer_",
)


FAMILY = Family(
    name="flux",
    endpoint="flux",
    defaults=GenerationDefaults(width=1024, height=1024, steps=20, cfg=3.5),
    media_type="image/png",
    pipeline_class=FluxPipeline,
    build_tiny=build_tiny_flux,
    denoiser_component="transformer",
    text_encoder_components=("text_encoder",),
    pipeline_kwargs=pipeline_kwargs,
    # Flux packs 2x2 latent patches: sizes step by twice the VAE's down-sampling.
    size_multiple=lambda pipe: pipe.vae_scale_factor * 2,
    lora_markers=("single_transformer_blocks", "double_blocks", "single_blocks", "ff_context"),
    block_groups=numbered_blocks("transformer_blocks", "single_transformer_blocks"),
    # ComfyUI's Flux files use BFL's module names, which diffusers reads only in kohya's naming.
    convert_lora=lambda tensors: comfyui_to_kohya(tensors, ("double_blocks.", "single_blocks.")),
    training=TRAINING,
)
