"""Wan 2.x text-to-video family: WanPipeline, served at /wan2.6 and /wan2.6-lora.

The endpoint returns an animated WebP; a clip's length must be 4k+1 frames because the Wan VAE
compresses time 4x around a first frame of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

from deployments.blocks import numbered_blocks
from deployments.errors import InvalidRequest
from deployments.family import Family, TrainingSpec
from deployments.schemas import GenerationDefaults, GenerationJob, VideoRequest
from deployments.tiny import tiny_t5_encoder, tiny_t5_tokenizer
from deployments.training_calls import frame_vae_encode

VAE_TEMPORAL_FACTOR = 4
# The transformer's attention projections: self-attention over the video tokens (attn1) and
# cross-attention to the prompt (attn2), which every Wan LoRA trainer targets.
LORA_TARGETS = tuple(
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
)

_TINY_SEED = 0
_TINY_TEXT_DIM = 32
_TINY_LATENT_CHANNELS = 4
# At default init the projected prompt tokens (rms 0.12) are small next to the video tokens (rms
# 0.6), so cross-attention barely moves the video and different prompts give near-identical
# clips; 4x on the prompt projection (both layers) makes the prompt show.
_TINY_TEXT_GAIN = 4.0
# The VAE folds 4x4 pixel patches into channels (as Wan 2.2's VAE does with 2x2) and then
# down-samples twice: 16x spatially, so its full-resolution convolutions run on 1/16 of the
# pixels and 832x480x33 decodes in seconds on a CPU.
_TINY_VAE_PATCH = 4


def _tiny_transformer() -> WanTransformer3DModel:
    torch.manual_seed(_TINY_SEED)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        # Rotary embedding splits a head over (t, h, w); 12 gives each axis 4 channels.
        attention_head_dim=12,
        in_channels=_TINY_LATENT_CHANNELS,
        out_channels=_TINY_LATENT_CHANNELS,
        text_dim=_TINY_TEXT_DIM,
        freq_dim=32,
        ffn_dim=48,
        num_layers=1,
    ).eval()
    with torch.no_grad():
        for parameter in model.condition_embedder.text_embedder.parameters():
            parameter.mul_(_TINY_TEXT_GAIN)
    return model


def _tiny_vae() -> AutoencoderKLWan:
    torch.manual_seed(_TINY_SEED)
    pixels_per_patch = 3 * _TINY_VAE_PATCH**2
    return AutoencoderKLWan(
        # Two channels at the highest resolution: the decoder's cost grows with output pixels.
        base_dim=2,
        z_dim=_TINY_LATENT_CHANNELS,
        dim_mult=[1, 2, 4],
        # One residual block per level: they widen the encoder's channels between levels, and
        # with none diffusers' encoder fails (training encodes images).
        num_res_blocks=1,
        temperal_downsample=[True, True],
        # The pipeline de-normalises latents with these; one entry per latent channel.
        latents_mean=[0.0] * _TINY_LATENT_CHANNELS,
        latents_std=[1.0] * _TINY_LATENT_CHANNELS,
        in_channels=pixels_per_patch,
        out_channels=pixels_per_patch,
        patch_size=_TINY_VAE_PATCH,
        scale_factor_temporal=VAE_TEMPORAL_FACTOR,
        scale_factor_spatial=2**2 * _TINY_VAE_PATCH,  # two down-samplings after the patches
    ).eval()


def _tiny_scheduler() -> UniPCMultistepScheduler:
    # Wan 2.1's own scheduler settings; flow_shift 3.0 is Wan's value for 480p.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )


def build_tiny_wan() -> WanPipeline:
    """Randomly initialised Wan-2.1-T2V-shaped pipeline, identical on every call."""
    return WanPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_t5_encoder(_TINY_TEXT_DIM, seed=_TINY_SEED, umt5=True),
        vae=_tiny_vae(),
        scheduler=_tiny_scheduler(),
        transformer=_tiny_transformer(),
    )


def pipeline_kwargs(job: GenerationJob) -> dict[str, Any]:
    """Wan runs true classifier-free guidance at `cfg`; the negative prompt is its unconditional
    branch (empty when none is given)."""
    return {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "width": job.width,
        "height": job.height,
        "num_frames": job.length,
        "num_inference_steps": job.steps,
        "guidance_scale": job.cfg,
    }


def check_job(job: GenerationJob) -> None:
    """WanPipeline would silently round another length to 4k+1 frames: refuse it instead."""
    if job.length is None or job.length % VAE_TEMPORAL_FACTOR != 1:
        raise InvalidRequest(
            f"length: must be 4k+1 frames for Wan (e.g. 33, 49, 81), got {job.length}"
        )


def _size_multiple(pipe: WanPipeline) -> int:
    # The transformer packs patch_size latent pixels into one token.
    return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]


# --- Training -----------------------------------------------------------------------------------

_TRAIN_MAX_SEQUENCE_LENGTH = 512  # UMT5 tokens, as the pipeline encodes prompts


def _encode_prompts(pipe, captions: list[str]) -> list[dict[str, Any]]:
    # Wan zero-pads every prompt to the full length itself, so embeddings stack as they are.
    embeds, _ = pipe.encode_prompt(
        prompt=list(captions),
        do_classifier_free_guidance=False,
        max_sequence_length=_TRAIN_MAX_SEQUENCE_LENGTH,
        device=pipe.transformer.device,
    )
    return [{"prompt_embeds": embed} for embed in embeds]


def _predict(pipe, noisy: torch.Tensor, sigmas: torch.Tensor, conds: list[dict]) -> torch.Tensor:
    """The velocity for BCHW latents, each image a one-frame video. Wan's transformer takes the
    scheduler's timestep (sigma x 1000) and predicts noise - x0 (UniPC's flow_prediction)."""
    out = pipe.transformer(
        hidden_states=noisy.unsqueeze(2),
        timestep=sigmas * 1000,
        encoder_hidden_states=torch.stack([c["prompt_embeds"] for c in conds]),
        return_dict=False,
    )[0]
    return out.squeeze(2)


# Images as one-frame videos: how musubi-tuner and AI Toolkit train Wan character LoRAs.
TRAINING = TrainingSpec(
    objective="flow_matching",
    encode_images=frame_vae_encode,
    encode_prompts=_encode_prompts,
    predict=_predict,
    # musubi-tuner's kohya layout, Wan's original module names (`lora_unet_blocks_0_self_attn_q`),
    # which ComfyUI and diffusers read.
    kohya_prefix="lora_unet_",
    kohya_module_names=(
        ("attn1.to_q", "self_attn.q"),
        ("attn1.to_k", "self_attn.k"),
        ("attn1.to_v", "self_attn.v"),
        ("attn1.to_out.0", "self_attn.o"),
        ("attn2.to_q", "cross_attn.q"),
        ("attn2.to_k", "cross_attn.k"),
        ("attn2.to_v", "cross_attn.v"),
        ("attn2.to_out.0", "cross_attn.o"),
        ("ffn.net.0.proj", "ffn.0"),
        ("ffn.net.2", "ffn.2"),
    ),
)


FAMILY = Family(
    name="wan",
    endpoint="wan2.6",
    defaults=GenerationDefaults(width=832, height=480, steps=30, cfg=6.0, length=33, fps=16),
    media_type="image/webp",
    pipeline_class=WanPipeline,
    build_tiny=build_tiny_wan,
    denoiser_component="transformer",
    # Wan LoRAs (musubi-tuner, diffusers) train the transformer only.
    text_encoder_components=(),
    pipeline_kwargs=pipeline_kwargs,
    size_multiple=_size_multiple,
    request_model=VideoRequest,
    output="video",
    check_job=check_job,
    # Wan's transformer is a flat `blocks` list (no other family has one) and only Wan names its
    # prompt attention cross_attn: diffusers, ComfyUI/musubi and kohya-style musubi keys.
    lora_markers=(
        "transformer.blocks.",
        "diffusion_model.blocks.",
        "lora_unet_blocks_",
        "cross_attn",
    ),
    block_groups=numbered_blocks("blocks"),
    # Attention and feed-forward of every block, as musubi-tuner trains Wan; diffusers reads a
    # Wan kohya file only with all of them.
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"),
    training=TRAINING,
)
