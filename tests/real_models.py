"""Real-size pipelines of every family, built on the meta device.

`meta_pipeline(family)` gives the family's own diffusers pipeline class holding the components a
LoRA can target, built from the published configs of the real checkpoints under
`torch.device("meta")`: every module name and shape is the real model's, and no weight is
allocated, so a LoRA file's keys and shapes can be checked against FLUX.1-dev or Wan 14B on a
laptop. VAEs, schedulers and tokenizers are None (no LoRA targets them); so are the text encoders
of families whose LoRAs target the denoiser only.
"""

from __future__ import annotations

import functools

import torch
from diffusers import (
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from deployments.family import get_family


def _clip_l(model_class=CLIPTextModel):
    # openai/clip-vit-large-patch14 text_config (FLUX.1-dev and SDXL text_encoder/config.json).
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    return model_class(config)


def _clip_bigg():
    # stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (OpenCLIP ViT-bigG/14).
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        projection_dim=1280,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config)


def _t5_xxl():
    # black-forest-labs/FLUX.1-dev text_encoder_2/config.json (google/t5-v1_1-xxl's encoder).
    config = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def _flux():
    # black-forest-labs/FLUX.1-dev transformer/config.json.
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    return {
        "scheduler": None,
        "vae": None,
        "text_encoder": _clip_l(),
        "tokenizer": None,
        "text_encoder_2": _t5_xxl(),
        "tokenizer_2": None,
        "transformer": transformer,
    }


def _sdxl():
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    return {
        "vae": None,
        "text_encoder": _clip_l(),
        "text_encoder_2": _clip_bigg(),
        "tokenizer": None,
        "tokenizer_2": None,
        "unet": unet,
        "scheduler": None,
        # The watermarker would need the optional invisible-watermark package.
        "add_watermarker": False,
    }


def _qwen_image():
    # Qwen/Qwen-Image transformer/config.json (Qwen-Image-Edit-2509 uses the same one).
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    )
    # Qwen2.5-VL is left out: this family's LoRAs target the transformer only.
    return {
        "scheduler": None,
        "vae": None,
        "text_encoder": None,
        "tokenizer": None,
        "transformer": transformer,
    }


def _qwen_image_edit():
    return {**_qwen_image(), "processor": None}


def _z_image():
    # Tongyi-MAI/Z-Image-Turbo transformer/config.json.
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512],
    )
    # Qwen3-4B is left out: ZImageLoraLoaderMixin loads into the transformer only.
    return {
        "scheduler": None,
        "vae": None,
        "text_encoder": None,
        "tokenizer": None,
        "transformer": transformer,
    }


def _wan():
    # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json.
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=40,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    )
    # UMT5-XXL is left out: Wan LoRAs target the transformer only.
    return {
        "tokenizer": None,
        "text_encoder": None,
        "vae": None,
        "scheduler": None,
        "transformer": transformer,
    }


_COMPONENTS = {
    "flux": _flux,
    "sdxl": _sdxl,
    "qwen_image": _qwen_image,
    "qwen_image_edit": _qwen_image_edit,
    "z_image": _z_image,
    "wan": _wan,
}


@functools.cache
def meta_pipeline(family: str):
    """The family's pipeline at the real model's sizes, every weight on the meta device."""
    with torch.device("meta"):
        components = _COMPONENTS[family]()
    return get_family(family).pipeline_class(**components)
