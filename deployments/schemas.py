"""Request and result models. Every field is bounded and unknown fields are refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_LORAS_PER_REQUEST = 4
MAX_SEED = 2**63 - 1
# A request's width and height; an edit's output, sized from its input image, too.
MIN_SIDE_PX = 64
MAX_SIDE_PX = 2048

_LORA_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
AUTO_TRIGGER = "auto"
MAX_BLOCK_GROUPS = 8
MAX_BLOCKS_PER_GROUP = 256

BlockWeight = Annotated[float, Field(ge=0.0, le=2.0)]
BlockWeights = dict[
    Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,64}$")],
    BlockWeight
    | Annotated[list[BlockWeight], Field(min_length=1, max_length=MAX_BLOCKS_PER_GROUP)],
]


class GenerationDefaults(BaseModel):
    """A family's production defaults; a model's config may override any of them."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(default=1024, ge=64, le=4096)
    height: int = Field(default=1024, ge=64, le=4096)
    steps: int = Field(default=20, ge=1, le=200)
    cfg: float = Field(default=3.5, ge=0.0, le=30.0)
    length: int | None = Field(default=None, ge=1, le=1025, description="Video frames.")
    fps: int | None = Field(default=None, ge=1, le=120, description="Video frame rate.")


class DefaultsOverride(BaseModel):
    """A model config's overrides of its family's defaults: only the fields given apply."""

    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(default=None, ge=64, le=4096)
    height: int | None = Field(default=None, ge=64, le=4096)
    steps: int | None = Field(default=None, ge=1, le=200)
    cfg: float | None = Field(default=None, ge=0.0, le=30.0)
    length: int | None = Field(default=None, ge=1, le=1025)
    fps: int | None = Field(default=None, ge=1, le=120)


class LoraSpec(BaseModel):
    """One adapter of a stack: `{id | name | url, strength, clip_strength, ...}`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str | None = Field(
        default=None,
        pattern=_LORA_ID_PATTERN,
        description="Character LoRA id: resolves to character-{id}.safetensors.",
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="File name under the LoRA root; sub-folders allowed.",
    )
    url: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="A .safetensors file by URL (https, or an fsspec URI such as s3://): only "
        "when the server enables remote LoRAs, from its allowed schemes and hosts.",
    )
    strength: float = Field(
        default=1.0,
        ge=0.0,
        le=2.0,
        validation_alias=AliasChoices("strength", "weight", "scale"),
        description="Model (denoiser) strength; aliases: weight, scale.",
    )
    clip_strength: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        description="Text-encoder strength (ComfyUI's strength_clip); defaults to strength.",
    )
    adapter_name: str | None = Field(
        default=None,
        pattern=_ADAPTER_NAME_PATTERN,
        description="A label for this adapter in logs; adapters are keyed by their file.",
    )
    trigger_word: str | None = Field(
        default=None,
        max_length=200,
        description='Prepended to the prompt; "auto": the trigger words of the file\'s metadata.',
    )
    block_weights: BlockWeights | None = Field(
        default=None,
        max_length=MAX_BLOCK_GROUPS,
        description="Denoiser strength per block group (flux: transformer_blocks, "
        "single_transformer_blocks; sdxl: input_blocks, middle_block, output_blocks; ...): a "
        "number for the whole group or one weight per block, multiplying `strength`.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> LoraSpec:
        if sum(source is not None for source in (self.id, self.name, self.url)) != 1:
            raise ValueError("give exactly one of id, name or url")
        return self

    @property
    def file_name(self) -> str:
        """The name in the LoRA store this spec points at."""
        return character_file_name(self.id) if self.id is not None else str(self.name)


def character_file_name(lora_id: str) -> str:
    return f"character-{lora_id}.safetensors"


def steps_field():
    """Denoising steps, as every generation body takes them (the OpenAI route's too)."""
    return Field(default=None, ge=1, le=150, description="Denoising steps.")


def cfg_field():
    """The guidance scale under both of its common names."""
    return Field(
        default=None,
        ge=0.0,
        le=30.0,
        validation_alias=AliasChoices("cfg", "guidance_scale"),
        description="Guidance scale; alias guidance_scale.",
    )


class GenerationRequest(BaseModel):
    """The JSON body of every generation endpoint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str = Field(default="", max_length=4000)
    width: int | None = Field(default=None, ge=MIN_SIDE_PX, le=MAX_SIDE_PX, description="Pixels.")
    height: int | None = Field(default=None, ge=MIN_SIDE_PX, le=MAX_SIDE_PX, description="Pixels.")
    steps: int | None = steps_field()
    cfg: float | None = cfg_field()
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Random when absent; echoed in X-Seed."
    )
    lora_id: str | None = Field(default=None, pattern=_LORA_ID_PATTERN)
    lora_name: str | None = Field(default=None, min_length=1, max_length=512)
    lora_strength: float = Field(default=1.0, ge=0.0, le=2.0)
    trigger_word: str | None = Field(
        default=None,
        max_length=200,
        description='Prepended to the prompt; "auto": the trigger words of every adapter\'s '
        "file metadata.",
    )
    loras: list[LoraSpec] = Field(default_factory=list, max_length=MAX_LORAS_PER_REQUEST)

    @model_validator(mode="after")
    def _one_lora_form(self) -> GenerationRequest:
        if self.lora_id is not None and self.lora_name is not None:
            raise ValueError("lora_id and lora_name: give one, not both")
        if self.loras and (self.lora_id is not None or self.lora_name is not None):
            raise ValueError("loras: use either the loras list or lora_id/lora_name, not both")
        return self

    def lora_stack(self) -> list[LoraSpec]:
        """The request's adapters in order, the short form turned into a one-item stack."""
        if self.lora_id is not None:
            return [LoraSpec(id=self.lora_id, strength=self.lora_strength)]
        if self.lora_name is not None:
            return [LoraSpec(name=self.lora_name, strength=self.lora_strength)]
        return list(self.loras)


class VideoRequest(GenerationRequest):
    """Video endpoints add the clip's length in frames and its frame rate."""

    length: int | None = Field(
        default=None, ge=1, le=257, description="Frames; Wan needs 4k+1 (33, 49, 81)."
    )
    fps: int | None = Field(default=None, ge=1, le=60, description="Frames per second.")


MAX_IMAGE_BASE64_CHARS = 48 * 1024 * 1024


class EditRequest(GenerationRequest):
    """Edit endpoints add the input image; width and height default to the image's size,
    scaled into MIN_SIDE_PX-MAX_SIDE_PX (deployments/job_sizes.py)."""

    image: str = Field(
        min_length=1,
        max_length=MAX_IMAGE_BASE64_CHARS,
        description="The image to edit: base64, or a data URI (data:image/png;base64,...).",
    )


_KEY_SEPARATOR = "@"


@dataclass(frozen=True)
class LoraRef:
    """One version of one adapter file."""

    name: str
    """Path relative to the root, with forward slashes."""
    version: str
    """Changes whenever the file's content may have changed (size, mtime or ETag)."""

    @property
    def key(self) -> str:
        """The multiplexed model id: a replica caches adapters per file version. `parse`
        reads it back; nothing else takes it apart."""
        return f"{self.name}{_KEY_SEPARATOR}{self.version}"

    @classmethod
    def parse(cls, key: str) -> LoraRef:
        """The file version a `key` names (a name may hold the separator; a version never)."""
        name, _, version = key.rpartition(_KEY_SEPARATOR)
        return cls(name=name, version=version)


class AdapterUse(BaseModel):
    """A resolved adapter as a replica receives it."""

    model_config = ConfigDict(extra="forbid")

    ref: LoraRef = Field(description="The file version: its key is the multiplexed model id.")
    url: str | None = Field(
        default=None, description="For a URL source: the checked URL, fetched by the replica."
    )
    strength: float
    clip_strength: float
    block_weights: BlockWeights = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def name(self) -> str:
        return self.ref.name


class GenerationJob(BaseModel):
    """What the ingress sends a deployment: every value resolved, nothing left to defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str
    width: int | None = Field(description="None: the input image's, for edit models.")
    height: int | None
    steps: int
    cfg: float
    seed: int
    adapters: list[AdapterUse]
    length: int | None = None
    fps: int | None = None
    image: bytes | None = Field(default=None, description="Encoded input image (edit models).")


class GenerationResult(BaseModel):
    """What a deployment returns: the encoded media and how it was made."""

    model_config = ConfigDict(extra="forbid")

    content: bytes
    media_type: str
    inference_ms: float
    gpu_seconds: float
    cost_usd: float
    lora_cache: list[str] = Field(description="hit or miss per adapter, in request order.")
    replica_id: str
