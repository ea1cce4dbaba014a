"""Qwen-Image-Edit family: QwenImageEditPlusPipeline, served at /qwen-image-edit and
/qwen-image-edit-lora.

The Plus pipeline is the one Qwen-Image-Edit-2509 and -2511 are published for (the original
QwenImageEditPipeline would load them, with the wrong prompt template and image sizes). Its
components are Qwen-Image's (deployments/qwen_image.py) plus a Qwen2-VL processor: the input image
reaches the model twice, as VAE latents beside the ones being denoised and as vision tokens in
the Qwen2.5-VL prompt. Edit LoRAs are Qwen-Image LoRAs, so the key markers are shared.
"""

from __future__ import annotations

from typing import Any

from diffusers import QwenImageEditPlusPipeline
from transformers import ProcessorMixin, Qwen2VLProcessor
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from deployments.blocks import numbered_blocks
from deployments.family import Family
from deployments.media import open_image
from deployments.qwen_image import (
    QWEN_IMAGE_LORA_MARKERS,
    TINY_VISION_MERGE,
    TINY_VISION_PATCH,
    TINY_VISION_TEMPORAL_PATCH,
    qwen_image_scheduler,
    qwen_size_multiple,
    tiny_qwen25_vl_text_encoder,
    tiny_qwen_image_transformer,
    tiny_qwen_image_vae,
    true_cfg_kwargs,
)
from deployments.schemas import EditRequest, GenerationDefaults, GenerationJob
from deployments.tiny import tiny_qwen2_tokenizer

# The vision tower sees the input image at no more than 8x8 merged tokens (the real processor
# keeps the pipeline's 384x384): enough for the prompt to depend on the image.
_TINY_VISION_FACTOR = TINY_VISION_PATCH * TINY_VISION_MERGE
_TINY_VISION_MAX_PIXELS = (8 * _TINY_VISION_FACTOR) ** 2


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor, which Qwen-Image-Edit never uses.

    transformers builds Qwen2VLProcessor only with a video processor class importable, and
    those need torchvision, which the CPU environment lacks. Without `video_processor` in the
    signature the processor's attributes are the image processor and the tokenizer alone, and
    `save_pretrained` / `from_pretrained` handle just those. A pipeline saved with this class
    records it by module path; diffusers then finds its loading method by looking the base class
    name `ProcessorMixin` up in this module, which is why that name is imported here.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(
            self, image_processor, tokenizer, chat_template=chat_template, **kwargs
        )


def tiny_qwen2_vl_processor() -> ImageOnlyQwen2VLProcessor:
    """Offline processor whose patch geometry matches the tiny vision tower."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=TINY_VISION_PATCH,
        merge_size=TINY_VISION_MERGE,
        temporal_patch_size=TINY_VISION_TEMPORAL_PATCH,
        min_pixels=_TINY_VISION_FACTOR**2,
        max_pixels=_TINY_VISION_MAX_PIXELS,
    )
    tokenizer = tiny_qwen2_tokenizer()
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_qwen_image_edit() -> QwenImageEditPlusPipeline:
    """Randomly initialised Qwen-Image-Edit-2511-shaped pipeline, identical on every call."""
    return QwenImageEditPlusPipeline(
        scheduler=qwen_image_scheduler(),
        vae=tiny_qwen_image_vae(),
        text_encoder=tiny_qwen25_vl_text_encoder(),
        tokenizer=tiny_qwen2_tokenizer(),
        processor=tiny_qwen2_vl_processor(),
        transformer=tiny_qwen_image_transformer(zero_cond_t=True),
    )


def pipeline_kwargs(job: GenerationJob) -> dict[str, Any]:
    """The pipeline renders at exactly the given width and height (multiples of 16, filled from
    the input image by the deployment). It resizes the input image itself, at the image's aspect
    ratio: to about 1024x1024 pixels for the VAE and 384x384 for the vision tower."""
    return {
        "image": open_image(job.image),
        "prompt": job.prompt,
        "width": job.width,
        "height": job.height,
        "num_inference_steps": job.steps,
        **true_cfg_kwargs(job),
    }


FAMILY = Family(
    name="qwen_image_edit",
    endpoint="qwen-image-edit",
    # width and height are not used: a request without them gets the input image's size.
    defaults=GenerationDefaults(width=1024, height=1024, steps=50, cfg=4.0),
    media_type="image/png",
    pipeline_class=QwenImageEditPlusPipeline,
    build_tiny=build_tiny_qwen_image_edit,
    denoiser_component="transformer",
    text_encoder_components=(),
    pipeline_kwargs=pipeline_kwargs,
    size_multiple=qwen_size_multiple,
    request_model=EditRequest,
    lora_markers=QWEN_IMAGE_LORA_MARKERS,
    block_groups=numbered_blocks("transformer_blocks"),
)
