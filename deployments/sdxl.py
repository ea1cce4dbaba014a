"""Stable Diffusion XL family: StableDiffusionXLPipeline, served at /sdxl and /sdxl-lora."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    Transformer2DModel,
    UNet2DConditionModel,
)

from deployments.blocks import Block, BlockGroups
from deployments.family import Family, TrainingSpec
from deployments.schemas import GenerationDefaults, GenerationJob
from deployments.tiny import (
    tiny_clip_text_model,
    tiny_clip_tokenizer,
)
from deployments.training_calls import vae_encode

_TINY_SEED = 0
_TINY_TEXT_DIM = 32
_TINY_PROJECTION_DIM = 32
_TINY_TIME_EMBED_DIM = 8
_TINY_LATENT_CHANNELS = 4
# At default init every Linear shrinks its input, so the UNet's attention adds little to its
# residual stream and a rank-4 attention LoRA moved a 1024x1024 image by only ~2 grey levels
# (mean abs); 8x on each transformer's output projection makes it ~9.
_TINY_ATTENTION_GAIN = 8.0
# The untrained UNet leaves latents of std ~12 after 28 steps, where the random decoder
# saturates and flattens differences (another prompt: 1.4 grey levels). The pipeline divides by
# scaling_factor before decoding, so 8 brings them near unit scale (another prompt: 2.4).
_TINY_VAE_SCALING_FACTOR = 8.0


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(_TINY_SEED)
    model = UNet2DConditionModel(
        sample_size=32,
        in_channels=_TINY_LATENT_CHANNELS,
        out_channels=_TINY_LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        # diffusers' UNet reads attention_head_dim as the number of heads.
        attention_head_dim=(2, 4),
        # SDXL concatenates both encoders' penultimate hidden states.
        cross_attention_dim=2 * _TINY_TEXT_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TINY_TIME_EMBED_DIM,
        # Six micro-conditioning numbers (sizes and crop) plus text_encoder_2's pooled projection.
        projection_class_embeddings_input_dim=6 * _TINY_TIME_EMBED_DIM + _TINY_PROJECTION_DIM,
        norm_num_groups=8,
    ).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Transformer2DModel):
                module.proj_out.weight.mul_(_TINY_ATTENTION_GAIN)
                module.proj_out.bias.mul_(_TINY_ATTENTION_GAIN)
    return model


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(_TINY_SEED)
    # Six blocks give vae_scale_factor 32, so 1024x1024 is a 32x32 latent; with 4 channels the
    # full-resolution decoder convolutions stay cheap on a CPU.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 6,
        up_block_types=("UpDecoderBlock2D",) * 6,
        block_out_channels=(4,) * 6,
        layers_per_block=1,
        latent_channels=_TINY_LATENT_CHANNELS,
        norm_num_groups=2,
        sample_size=64,
        scaling_factor=_TINY_VAE_SCALING_FACTOR,
    ).eval()


def _tiny_scheduler() -> EulerDiscreteScheduler:
    # SDXL base 1.0's scheduler config.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """Randomly initialised SDXL-base-shaped pipeline, identical on every call."""
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=tiny_clip_text_model(hidden_size=_TINY_TEXT_DIM, seed=_TINY_SEED),
        text_encoder_2=tiny_clip_text_model(
            hidden_size=_TINY_TEXT_DIM, seed=_TINY_SEED + 1, with_projection=True
        ),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=_tiny_unet(),
        scheduler=_tiny_scheduler(),
    )


def pipeline_kwargs(job: GenerationJob) -> dict[str, Any]:
    """SDXL runs classifier-free guidance at `guidance_scale`; an empty negative prompt is left
    out, so the pipeline uses zero embeddings for it as SDXL base is configured to."""
    kwargs: dict[str, Any] = {
        "prompt": job.prompt,
        "width": job.width,
        "height": job.height,
        "num_inference_steps": job.steps,
        "guidance_scale": job.cfg,
    }
    if job.negative_prompt:
        kwargs["negative_prompt"] = job.negative_prompt
    return kwargs


def _sgm_blocks(unet) -> dict[str, list[Block]]:
    """ComfyUI's block numbering of an SDXL UNet (the SGM checkpoint layout), over diffusers'
    modules. input_blocks.0 is conv_in; then, per down block, one block per layer (a resnet and
    its attention) and one for its downsampler. middle_block is the whole mid block.
    output_blocks are one per layer of each up block, the last also holding its upsampler."""
    inputs: list[Block] = [("conv_in",)]
    for i, down in enumerate(unet.down_blocks):
        inputs += [_unet_layer(f"down_blocks.{i}", down, j) for j in range(len(down.resnets))]
        if down.downsamplers is not None:
            inputs.append((f"down_blocks.{i}.downsamplers",))
    outputs: list[Block] = []
    for i, up in enumerate(unet.up_blocks):
        layers = [_unet_layer(f"up_blocks.{i}", up, j) for j in range(len(up.resnets))]
        if up.upsamplers is not None:
            layers[-1] += (f"up_blocks.{i}.upsamplers",)
        outputs += layers
    return {"input_blocks": inputs, "middle_block": [("mid_block",)], "output_blocks": outputs}


def _unet_layer(path: str, block, index: int) -> Block:
    if getattr(block, "attentions", None) is None:
        return (f"{path}.resnets.{index}",)
    return (f"{path}.resnets.{index}", f"{path}.attentions.{index}")


SDXL_BLOCK_GROUPS = BlockGroups(
    names=("input_blocks", "middle_block", "output_blocks"), blocks=_sgm_blocks
)


# --- Training -----------------------------------------------------------------------------------


def _encode_prompts(pipe, captions: list[str]) -> list[dict[str, Any]]:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(captions), device=pipe.unet.device, do_classifier_free_guidance=False
    )
    return [{"prompt_embeds": embeds[i], "pooled": pooled[i]} for i in range(len(captions))]


def _predict(pipe, noisy: torch.Tensor, timesteps: torch.Tensor, conds: list[dict]) -> torch.Tensor:
    """The UNet's noise prediction, with SDXL's size conditioning: the image was this size,
    uncropped (buckets resize the whole image)."""
    height, width = (side * pipe.vae_scale_factor for side in noisy.shape[-2:])
    pooled = torch.stack([c["pooled"] for c in conds])
    time_ids = pipe._get_add_time_ids(
        (height, width),
        (0, 0),
        (height, width),
        dtype=pooled.dtype,
        text_encoder_projection_dim=int(pooled.shape[-1]),
    ).repeat(noisy.shape[0], 1)
    return pipe.unet(
        noisy,
        timesteps,
        encoder_hidden_states=torch.stack([c["prompt_embeds"] for c in conds]),
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(noisy.device)},
        return_dict=False,
    )[0]


TRAINING = TrainingSpec(
    objective="epsilon",  # SDXL base predicts the noise
    encode_images=vae_encode,
    encode_prompts=_encode_prompts,
    predict=_predict,
    kohya_prefix="lora_unet_",  # kohya's diffusers-named UNet keys, which diffusers reads
)


FAMILY = Family(
    name="sdxl",
    endpoint="sdxl",
    defaults=GenerationDefaults(width=1024, height=1024, steps=28, cfg=7.5),
    media_type="image/png",
    pipeline_class=StableDiffusionXLPipeline,
    build_tiny=build_tiny_sdxl,
    denoiser_component="unet",
    text_encoder_components=("text_encoder", "text_encoder_2"),
    pipeline_kwargs=pipeline_kwargs,
    # The UNet matches odd latent sizes on its way up (upsample_size), so any whole latent works.
    size_multiple=lambda pipe: pipe.vae_scale_factor,
    # Fragments of SDXL's UNet block names (diffusers, and kohya's SGM spelling) and of its second
    # text encoder. Not "lora_te1_": kohya's Flux files name their CLIP encoder that way too.
    lora_markers=(
        "down_blocks",
        "mid_block",
        "up_blocks",
        "input_blocks",
        "middle_block",
        "output_blocks",
        "lora_te2_",
        "text_encoder_2",
    ),
    block_groups=SDXL_BLOCK_GROUPS,
    training=TRAINING,
)
