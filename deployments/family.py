"""The family spec: everything that is particular to one base model, as data plus small functions.

Serving (deployments/base.py) and training read a family only through this spec; nothing outside
`deployments/<family>.py` names a family's pipeline class.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator

from deployments.blocks import BlockGroups
from deployments.schemas import GenerationDefaults, GenerationJob, GenerationRequest

# Family name -> module that defines `FAMILY`. Imported on first use, so reading a config does
# not build or import a model it does not serve.
_FAMILY_MODULES = {
    "flux": "deployments.flux",
    "qwen_image": "deployments.qwen_image",
    "qwen_image_edit": "deployments.qwen_image_edit",
    "z_image": "deployments.z_image",
    "wan": "deployments.wan",
    "sdxl": "deployments.sdxl",
}
FAMILY_NAMES = tuple(_FAMILY_MODULES)


def check_family_name(name: str) -> str:
    """`name` if a family has it; the ValueError names the known ones."""
    if name not in FAMILY_NAMES:
        raise ValueError(f"unknown family {name!r}; expected one of {list(FAMILY_NAMES)}")
    return name


# A config field holding a family's name; pydantic reports a bad one under the field.
FamilyName = Annotated[str, AfterValidator(check_family_name)]


@dataclass(frozen=True)
class TrainingSpec:
    """How a family's LoRA is trained: the objective and the three model calls it needs.

    The train loop (cluster/train/loop.py) owns noise, timesteps and the loss; these functions
    own what is particular to the model: how images and captions become its inputs, and how the
    denoiser is called (latent packing, timestep convention, the sign of its output)."""

    objective: Literal["flow_matching", "epsilon", "v_prediction"]
    """flow_matching: x_t = (1 - s) x0 + s noise, target noise - x0 (`predict` gets s in [0, 1]);
    epsilon / v_prediction: the scheduler's DDPM forward process (`predict` gets t in [0, 1000))."""
    encode_images: Callable[[Any, Any], Any]
    """(pipe, pixels in [-1, 1], BCHW) -> normalised latents, BCHW."""
    encode_prompts: Callable[[Any, list[str]], list[dict[str, Any]]]
    """(pipe, captions) -> one conditioning dict per caption (cacheable per caption)."""
    predict: Callable[[Any, Any, Any, list[dict[str, Any]]], Any]
    """(pipe, noisy latents BCHW, timesteps (B,), conditionings) -> the prediction, BCHW."""
    kohya_prefix: str = "lora_unet_"
    """kohya names a module `<prefix><module path with _ for .>` (lora_down/lora_up/alpha)."""
    kohya_module_names: tuple[tuple[str, str], ...] = ()
    """(diffusers module name, the original model's) pairs, for families whose kohya files use
    the original names (Wan: `attn1.to_q` is `self_attn.q`); a module path ending in the first
    is written with the second."""


@dataclass(frozen=True)
class Family:
    name: str
    endpoint: str
    """HTTP path stem: /<endpoint> and /<endpoint>-lora."""
    defaults: GenerationDefaults
    media_type: str
    """image/png, image/jpeg or image/webp: what the endpoint returns."""
    pipeline_class: type
    build_tiny: Callable[[], Any]
    """Builds the tiny:// pipeline: real classes, tiny sizes, fixed seeds, nothing downloaded."""
    denoiser_component: str
    """The pipeline attribute holding the transformer or UNet."""
    text_encoder_components: tuple[str, ...]
    """Pipeline attributes of text encoders that LoRAs may target (scaled by clip_strength)."""
    pipeline_kwargs: Callable[[GenerationJob], dict[str, Any]]
    """Maps a resolved job to the pipeline call's keyword arguments (no generator)."""
    size_multiple: Callable[[Any], int]
    """The loaded pipeline's width and height step in pixels (VAE scale x patch size)."""
    request_model: type[GenerationRequest] = GenerationRequest
    """The endpoint's body: GenerationRequest, VideoRequest (length, fps) or EditRequest."""
    output: Literal["image", "video"] = "image"
    """image: the pipeline returns `.images`; video: `.frames`, encoded at the job's fps."""
    check_job: Callable[[GenerationJob], None] | None = None
    """Family-specific rules on a resolved job (Wan's 4k+1 frames); raises InvalidRequest."""
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Name endings of the denoiser's Linear layers a LoRA of this family trains (attention
    projections by default): what training adds adapters to, and what demo adapters touch."""
    lora_markers: tuple[str, ...] = ()
    """Key fragments found only in this family's LoRA files, so a LoRA sent to the wrong
    endpoint is refused with both families named."""
    block_groups: BlockGroups | None = None
    """The denoiser's block groups that `block_weights` scale, in model order."""
    convert_lora: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Renames a LoRA file's keys to a layout diffusers' converters read, where diffusers lacks
    one for a format of this family (see deployments/lora_keys.py); None: diffusers reads all."""
    training: TrainingSpec | None = None
    """How LoRAs of this family are trained; None: training refuses the family."""

    @property
    def lora_components(self) -> tuple[str, ...]:
        return (self.denoiser_component, *self.text_encoder_components)


def detect_lora_family(keys) -> str | None:
    """The family whose LoRA key markers the most denoiser keys carry (text-encoder keys
    only where the file has no other), or None if no marker matches. Text encoders are shared
    between families (Flux's T5 part is named `lora_te2_`, as SDXL's second CLIP is), so they
    never outvote the denoiser."""
    keys = list(keys)
    denoiser_keys = [key for key in keys if not _is_text_encoder_key(key)]
    keys = denoiser_keys or keys
    scores = {}
    for name in FAMILY_NAMES:
        markers = get_family(name).lora_markers
        scores[name] = sum(any(m in key for m in markers) for key in keys) if markers else 0
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else None


def _is_text_encoder_key(key: str) -> bool:
    return key.startswith(("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder"))


def get_family(name: str) -> Family:
    """The spec of a family by name; ValueError names the known ones."""
    return importlib.import_module(_FAMILY_MODULES[check_family_name(name)]).FAMILY
