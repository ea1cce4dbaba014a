"""Qwen-Image family: QwenImagePipeline, served at /qwen-image-2512 and /qwen-image-2512-lora.

The tiny builders here (Qwen2.5-VL text encoder, transformer, VAE, scheduler) are shared with the
Qwen-Image-Edit family, whose checkpoints use the same component classes.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from deployments.blocks import numbered_blocks
from deployments.family import Family, TrainingSpec
from deployments.schemas import GenerationDefaults, GenerationJob
from deployments.tiny import QWEN_SPECIALS, QWEN_VOCAB_SIZE, tiny_qwen2_tokenizer
from deployments.training_calls import frame_vae_encode

TINY_SEED = 0
TINY_TEXT_DIM = 32
TINY_LATENT_CHANNELS = 4
# The tiny vision tower's patch geometry; the Edit family's image processor must use the same.
TINY_VISION_PATCH = 4
TINY_VISION_MERGE = 2
TINY_VISION_TEMPORAL_PATCH = 2
# At default init the modulation gates come out small, so attention barely reaches the output
# (a one-word prompt change moved the image by 0.8 grey levels, the edit's input image by 3);
# scaled modulation projections make it 8 and 8 (the same fix as the tiny Flux's AdaLN gain).
_TINY_MODULATION_GAIN = 8.0
# With unit QK-norm weights the attention logits are O(1): every image token attends almost
# evenly to thousands of others, and the few dozen prompt tokens are averaged away (different edit
# prompts changed the image by 0.3 grey levels). Sharper attention, with the text keys sharper
# still so they compete with the edit's 4096 input-image tokens, makes it 7 to 18.
_TINY_QK_NORM_GAIN = 3.0
_TINY_TEXT_KEY_GAIN = 2.0
_TINY_VAE_CONV_GAIN = 2.0  # see tiny_qwen_image_vae

# The attention projections of both streams: what a LoRA of this family adapts at least.
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
# LoRA module-name fragments that only Qwen-Image's transformer has, in dotted (diffusers,
# ComfyUI / AI Toolkit `diffusion_model.`) and flattened (kohya / musubi `lora_unet_`) keys.
# Plain `img_mlp` / `img_mod` would also match FLUX.1's original keys (`img_mlp.0`, `img_mod.lin`).
QWEN_IMAGE_LORA_MARKERS = (
    "img_mlp.net",
    "txt_mlp.net",
    "img_mod.1",
    "txt_mod.1",
    "img_mlp_net",
    "txt_mlp_net",
    "img_mod_1",
    "txt_mod_1",
)


def qwen_special_id(token: str) -> int:
    """The id `tiny_qwen2_tokenizer` gives a special token: they follow the byte tokens."""
    return QWEN_VOCAB_SIZE - len(QWEN_SPECIALS) + QWEN_SPECIALS.index(token)


def tiny_qwen25_vl_text_encoder(seed: int = TINY_SEED) -> Qwen2_5_VLForConditionalGeneration:
    """Two-layer Qwen2.5-VL (text and vision tower) matching `tiny_qwen2_tokenizer`."""
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": QWEN_VOCAB_SIZE,
            "hidden_size": TINY_TEXT_DIM,
            "intermediate_size": 2 * TINY_TEXT_DIM,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            # mrope splits each head's rotary half (head_dim 16 / 2) over time, height, width.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": qwen_special_id("<|endoftext|>"),
            "eos_token_id": qwen_special_id("<|im_end|>"),
            "pad_token_id": qwen_special_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": TINY_VISION_PATCH,
            "spatial_merge_size": TINY_VISION_MERGE,
            "temporal_patch_size": TINY_VISION_TEMPORAL_PATCH,
            "window_size": 2 * TINY_VISION_PATCH * TINY_VISION_MERGE,
            "fullatt_block_indexes": [0],
            "out_hidden_size": TINY_TEXT_DIM,
        },
        # The vision placeholders must be the tokenizer's ids, or image features land nowhere.
        image_token_id=qwen_special_id("<|image_pad|>"),
        video_token_id=qwen_special_id("<|video_pad|>"),
        vision_start_token_id=qwen_special_id("<|vision_start|>"),
        vision_end_token_id=qwen_special_id("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_transformer(
    seed: int = TINY_SEED, zero_cond_t: bool = False
) -> QwenImageTransformer2DModel:
    """One dual-stream block with a single 16-wide head: at 1328x1328 the image alone is 6889
    tokens, and joint attention over them dominates the render time. `zero_cond_t` is
    Qwen-Image-Edit-2511's flag: the input image's tokens are modulated as at timestep 0."""
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        # The pipeline packs 2x2 latent patches into the token channels.
        in_channels=4 * TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=1,
        joint_attention_dim=TINY_TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t,
    ).eval()
    with torch.no_grad():
        for block in model.transformer_blocks:
            for modulation in (block.img_mod[1], block.txt_mod[1]):
                modulation.weight.mul_(_TINY_MODULATION_GAIN)
                modulation.bias.mul_(_TINY_MODULATION_GAIN)
            attn = block.attn
            for norm in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k):
                norm.weight.mul_(_TINY_QK_NORM_GAIN)
            attn.norm_added_k.weight.mul_(_TINY_TEXT_KEY_GAIN)
    return model


def tiny_qwen_image_vae(seed: int = TINY_SEED) -> AutoencoderKLQwenImage:
    """Qwen-Image's causal 3D VAE with 4 channels. Three down-samplings, as in the real one:
    a scale factor of 16 would make sizes step by 32, and 1328 is not a multiple of 32."""
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=TINY_LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=0,
        temperal_downsample=[False, True, True],
        # The tiny latents are not normalised: mean 0 and std 1 leave them as they are.
        latents_mean=[0.0] * TINY_LATENT_CHANNELS,
        latents_std=[1.0] * TINY_LATENT_CHANNELS,
    ).eval()
    # At default init every convolution shrinks its input and adds a bias, so after a dozen of
    # them the decoded image no longer depends on the latents (mean abs difference 0.001 between
    # two random latents, on [-1, 1]); without biases and with twice the weights it is 0.34.
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                module.weight.mul_(_TINY_VAE_CONV_GAIN)
                module.bias.zero_()
    return vae


def qwen_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's own scheduler settings (exponential resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def build_tiny_qwen_image() -> QwenImagePipeline:
    """Randomly initialised Qwen-Image-shaped pipeline, identical on every call."""
    return QwenImagePipeline(
        scheduler=qwen_image_scheduler(),
        vae=tiny_qwen_image_vae(),
        text_encoder=tiny_qwen25_vl_text_encoder(),
        tokenizer=tiny_qwen2_tokenizer(),
        transformer=tiny_qwen_image_transformer(),
    )


def true_cfg_kwargs(job: GenerationJob) -> dict[str, Any]:
    """Qwen-Image has no distilled guidance: cfg is true classifier-free guidance, and the
    pipeline runs the unconditional pass only when it is given a negative prompt. The endpoint
    promises that cfg applies to every request, so an empty negative prompt becomes " " (as in
    the Qwen-Image model card). cfg <= 1 means no guidance: no negative pass is run."""
    if job.cfg <= 1.0:
        return {"true_cfg_scale": job.cfg}
    return {"true_cfg_scale": job.cfg, "negative_prompt": job.negative_prompt or " "}


def pipeline_kwargs(job: GenerationJob) -> dict[str, Any]:
    return {
        "prompt": job.prompt,
        "width": job.width,
        "height": job.height,
        "num_inference_steps": job.steps,
        **true_cfg_kwargs(job),
    }


def qwen_size_multiple(pipe) -> int:
    """Latents are packed in 2x2 patches: sizes step by twice the VAE's down-sampling."""
    return pipe.vae_scale_factor * 2


# --- Training -----------------------------------------------------------------------------------

_TRAIN_MAX_SEQUENCE_LENGTH = 512  # as the pipeline encodes prompts


def _encode_prompts(pipe, captions: list[str]) -> list[dict[str, Any]]:
    # Padding removed per caption: a cached embedding must not depend on the other captions it
    # was encoded with. `_predict` pads a batch again and masks the padding.
    embeds, mask = pipe.encode_prompt(
        prompt=list(captions),
        device=pipe.transformer.device,
        max_sequence_length=_TRAIN_MAX_SEQUENCE_LENGTH,
    )
    if mask is None:  # the pipeline drops an all-true mask
        return [{"prompt_embeds": embed} for embed in embeds]
    return [{"prompt_embeds": embed[keep.bool()]} for embed, keep in zip(embeds, mask, strict=True)]


def _predict(pipe, noisy: torch.Tensor, sigmas: torch.Tensor, conds: list[dict]) -> torch.Tensor:
    """The transformer's velocity for BCHW latents: packed into 2x2 patches and back, with the
    batch's prompts padded to the longest and masked."""
    batch, channels, height, width = noisy.shape
    packed = pipe._pack_latents(noisy, batch, channels, height, width)
    lengths = [c["prompt_embeds"].shape[0] for c in conds]
    embeds = torch.nn.utils.rnn.pad_sequence([c["prompt_embeds"] for c in conds], batch_first=True)
    mask = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    out = pipe.transformer(
        hidden_states=packed,
        timestep=sigmas,  # the pipeline passes t / 1000: the sigma itself
        encoder_hidden_states=embeds,
        encoder_hidden_states_mask=mask,
        img_shapes=[[(1, height // 2, width // 2)]] * batch,
        return_dict=False,
    )[0]
    scale = pipe.vae_scale_factor
    return pipe._unpack_latents(out, height * scale, width * scale, scale).squeeze(2)


TRAINING = TrainingSpec(
    objective="flow_matching",
    encode_images=frame_vae_encode,
    encode_prompts=_encode_prompts,
    predict=_predict,
    kohya_prefix="lora_unet_",  # `lora_unet_transformer_blocks_0_attn_to_q`, as diffusers reads
)


FAMILY = Family(
    name="qwen_image",
    endpoint="qwen-image-2512",
    defaults=GenerationDefaults(width=1328, height=1328, steps=50, cfg=4.0),
    media_type="image/png",
    pipeline_class=QwenImagePipeline,
    build_tiny=build_tiny_qwen_image,
    denoiser_component="transformer",
    # AI Toolkit trains Qwen-Image LoRAs on the transformer only.
    text_encoder_components=(),
    pipeline_kwargs=pipeline_kwargs,
    size_multiple=qwen_size_multiple,
    lora_markers=QWEN_IMAGE_LORA_MARKERS,
    block_groups=numbered_blocks("transformer_blocks"),
    training=TRAINING,
)
