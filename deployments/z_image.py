"""Z-Image Turbo family: ZImagePipeline, served at /z-image and /z-image-lora."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from deployments.blocks import numbered_blocks
from deployments.family import Family, TrainingSpec
from deployments.lora_keys import comfyui_to_kohya
from deployments.schemas import GenerationDefaults, GenerationJob
from deployments.tiny import QWEN_VOCAB_SIZE, tiny_latent_vae, tiny_qwen2_tokenizer
from deployments.training_calls import vae_encode

_TINY_SEED = 0
_TINY_TEXT_DIM = 32
_TINY_LATENT_CHANNELS = 4
_TINY_MAX_TOKENS = 512  # the pipeline pads every prompt to max_sequence_length=512

# Qwen3's template as the pipeline renders it (one user turn, generation prompt, thinking on):
# the text encoder then sees the same special tokens around the prompt as with the real one.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ATTENTION_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
FEED_FORWARD_TARGETS = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _tiny_transformer() -> ZImageTransformer2DModel:
    torch.manual_seed(_TINY_SEED)
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=_TINY_LATENT_CHANNELS,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=_TINY_TEXT_DIM,
        # The head size (16) splits into the text-position, height and width axes of RoPE.
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 128, 128],
    ).eval()


def _tiny_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen3Model:
    config = Qwen3Config(
        vocab_size=QWEN_VOCAB_SIZE,
        hidden_size=_TINY_TEXT_DIM,
        intermediate_size=2 * _TINY_TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=_TINY_TEXT_DIM // 2,
        max_position_embeddings=_TINY_MAX_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(_TINY_SEED)
    return Qwen3Model(config).eval()


def _tiny_tokenizer() -> Qwen2Tokenizer:
    tokenizer = tiny_qwen2_tokenizer(model_max_length=_TINY_MAX_TOKENS)
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Z-Image Turbo's settings: a fixed shift of 3, no resolution-dependent shift.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )


def build_tiny_z_image() -> ZImagePipeline:
    """Randomly initialised Z-Image-Turbo-shaped pipeline, identical on every call."""
    tokenizer = _tiny_tokenizer()
    return ZImagePipeline(
        scheduler=_tiny_scheduler(),
        # One resnet per VAE block (layers_per_block=0): the decoder's full-resolution
        # convolutions dominate a CPU call.
        vae=tiny_latent_vae(_TINY_LATENT_CHANNELS, layers_per_block=0, seed=_TINY_SEED),
        text_encoder=_tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=_tiny_transformer(),
    )


def pipeline_kwargs(job: GenerationJob) -> dict[str, Any]:
    """Classifier-free guidance at `cfg` against the negative prompt (the empty prompt when
    none is given). LoRAs work best at 4.5; cfg 0 is Turbo's distilled single pass, which
    ignores the negative prompt."""
    return {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "width": job.width,
        "height": job.height,
        "num_inference_steps": job.steps,
        "guidance_scale": job.cfg,
    }


# --- Training -----------------------------------------------------------------------------------

_TRAIN_MAX_SEQUENCE_LENGTH = 512  # as the pipeline encodes prompts


def _encode_prompts(pipe, captions: list[str]) -> list[dict[str, Any]]:
    # One embedding per caption, its padding already removed: lengths differ per caption.
    embeds = pipe._encode_prompt(
        prompt=list(captions),
        device=pipe.transformer.device,
        max_sequence_length=_TRAIN_MAX_SEQUENCE_LENGTH,
    )
    return [{"prompt_embeds": embed} for embed in embeds]


def _predict(pipe, noisy: torch.Tensor, sigmas: torch.Tensor, conds: list[dict]) -> torch.Tensor:
    """The velocity (noise - x0) for BCHW latents. The transformer takes a list of CFHW
    latents and time running from 0 (noise) to 1 (image), and returns minus the velocity,
    as the pipeline's sampling loop shows."""
    frames = list(noisy.to(pipe.transformer.dtype).unsqueeze(2).unbind(dim=0))
    out = pipe.transformer(
        frames, 1.0 - sigmas, [c["prompt_embeds"] for c in conds], return_dict=False
    )[0]
    return -torch.stack([o.float() for o in out], dim=0).squeeze(2)


TRAINING = TrainingSpec(
    objective="flow_matching",
    encode_images=vae_encode,
    encode_prompts=_encode_prompts,
    predict=_predict,
    kohya_prefix="lora_unet_",  # `lora_unet_layers_0_attention_to_q`, as diffusers reads
)


FAMILY = Family(
    name="z_image",
    endpoint="z-image",
    defaults=GenerationDefaults(width=1024, height=1024, steps=8, cfg=4.5),
    media_type="image/jpeg",
    pipeline_class=ZImagePipeline,
    build_tiny=build_tiny_z_image,
    denoiser_component="transformer",
    # ZImageLoraLoaderMixin loads into the transformer only.
    text_encoder_components=(),
    pipeline_kwargs=pipeline_kwargs,
    # The transformer packs 2x2 latent patches: sizes step by twice the VAE's down-sampling.
    size_multiple=lambda pipe: pipe.vae_scale_factor * 2,
    # Z-Image trainers (AI Toolkit, LyCORIS) adapt the blocks' attention and feed-forward layers.
    lora_targets=ATTENTION_TARGETS + FEED_FORWARD_TARGETS,
    # Module names of Z-Image's transformer: diffusers/AI Toolkit (`layers.0.attention.to_q`),
    # kohya/musubi (`lora_unet_layers_0_attention_qkv`) and ComfyUI (`layers.0.attention.qkv`).
    lora_markers=(
        "noise_refiner",
        "context_refiner",
        ".attention.to_",
        "_attention_to_",
        "attention.qkv",
        "attention_qkv",
        "attention.out",
        "attention_out",
        "feed_forward",
    ),
    block_groups=numbered_blocks("noise_refiner", "context_refiner", "layers"),
    # ComfyUI's Z-Image files use the original fused `attention.qkv` and `attention.out`, which
    # diffusers splits and renames only in kohya's naming.
    convert_lora=lambda tensors: comfyui_to_kohya(tensors, ("attention.qkv.", "attention.out.")),
    training=TRAINING,
)
