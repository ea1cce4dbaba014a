"""The OpenAI images API's request and answer (`POST /v1/images/generations`, `GET /v1/models`),
and the native generation body a request stands for.

Pure request logic, no Serve. `model` names a deployment (its name or endpoint), optionally
with LoRAs: `flux:character-abc123`, `flux:styles/ink@0.6+character-abc123` (file names under
the LoRA root, `.safetensors` optional, `@` a strength, `+` between LoRAs). loraplex's own
fields (`seed`, `steps`, `loras`, ...) come in the body, where the openai client's
`extra_body` puts them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployments.config import ModelConfig
from deployments.errors import InvalidRequest
from deployments.family import get_family
from deployments.loras.store import LORA_SUFFIX
from deployments.schemas import (
    MAX_LORAS_PER_REQUEST,
    MAX_SEED,
    MAX_SIDE_PX,
    MIN_SIDE_PX,
    EditRequest,
    LoraSpec,
    cfg_field,
    steps_field,
)
from serve.config import AppConfig
from serve.validation import describe_validation_error

MAX_IMAGES = 4
LORA_SEPARATOR = "+"
STRENGTH_SEPARATOR = "@"
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageGenerationRequest(BaseModel):
    """OpenAI's image generation body, with loraplex's generation fields beside it."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [{"model": "flux", "prompt": "a lighthouse at dusk", "size": "512x512"}]
        },
    )

    model: str = Field(
        min_length=1,
        max_length=4096,
        description="A deployment's name or endpoint (`flux`, `flux-lora`), optionally with "
        "LoRAs: `flux:character-abc123`, `flux:styles/ink@0.6+character-abc123`.",
    )
    prompt: str = Field(min_length=1, max_length=4000)
    n: int | None = Field(
        default=None,
        ge=1,
        le=MAX_IMAGES,
        description="How many images (default 1), at seeds seed, seed+1, ...",
    )
    size: str | None = Field(
        default=None,
        max_length=16,
        description=f'"WIDTHxHEIGHT", each {MIN_SIDE_PX}-{MAX_SIDE_PX} ("512x512"); absent or '
        '"auto": the model\'s default size.',
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        default=None, description="b64_json (the default); url is refused."
    )
    user: str | None = Field(
        default=None, max_length=256, description="OpenAI's end-user id: accepted, not used."
    )
    negative_prompt: str | None = Field(default=None, max_length=4000)
    steps: int | None = steps_field()
    cfg: float | None = cfg_field()
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED - MAX_IMAGES + 1,
        description="The first image's seed, random when absent; the n-th image's is seed+n-1.",
    )
    trigger_word: str | None = Field(default=None, max_length=200)
    loras: list[LoraSpec] = Field(
        default_factory=list,
        max_length=MAX_LORAS_PER_REQUEST,
        description="Adapters as the native endpoints take them, after those in `model`.",
    )

    @field_validator("size")
    @classmethod
    def _size_in_range(cls, size: str | None) -> str | None:
        if size is None or size == "auto":
            return None
        match = _SIZE.match(size)
        if match is None:
            raise ValueError(f'{size!r} is not "WIDTHxHEIGHT" (e.g. "512x512") or "auto"')
        if not all(MIN_SIDE_PX <= int(side) <= MAX_SIDE_PX for side in match.groups()):
            raise ValueError(f"{size}: each side must be {MIN_SIDE_PX}-{MAX_SIDE_PX} pixels")
        return size


class ImageData(BaseModel):
    b64_json: str = Field(description="The image, base64-encoded (its format: output_format).")
    revised_prompt: str = Field(description="The prompt as rendered: trigger words, no tags.")
    seed: int = Field(description="This image's seed; the native endpoint gives its bytes.")


class ImagesResponse(BaseModel):
    """OpenAI's images answer."""

    created: int = Field(description="Unix time of the answer, in seconds.")
    data: list[ImageData]
    output_format: str = Field(description="png, jpeg, ...: the model's format.")
    size: str = Field(description="WIDTHxHEIGHT rendered.")


class ModelCard(BaseModel):
    id: str = Field(description="The deployment's name: what `model` takes.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time this ingress replica started, in seconds.")
    owned_by: str = "loraplex"
    family: str
    endpoint: str = Field(description="The native endpoint, /<endpoint>; also a `model`.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def find_model(config: AppConfig, model: str) -> tuple[ModelConfig, bool, list[LoraSpec]]:
    """(the deployment, lora_required, the LoRAs `model` names); InvalidRequest naming `model`
    for an unknown deployment, one that makes no still image, or a malformed LoRA list."""
    deployment, separator, lora_text = model.partition(":")
    found = _deployment(config, deployment)
    family = get_family(found[0].family)
    if family.output != "image" or issubclass(family.request_model, EditRequest):
        what = "an edit model" if family.output == "image" else f"a {family.output} model"
        raise InvalidRequest(
            f"model: {deployment} is {what}; this API makes images from a prompt, so use "
            f"POST /{found[0].endpoint}"
        )
    if separator and not lora_text:
        raise InvalidRequest(f"model: {model!r} names no LoRA after ':'")
    specs = [_lora(item) for item in lora_text.split(LORA_SEPARATOR)] if separator else []
    return found[0], found[1], specs


def _deployment(config: AppConfig, name: str) -> tuple[ModelConfig, bool]:
    for model in config.models:
        if name == model.name:
            return model, False
    found = config.model_for_endpoint(name)
    if found is None:
        known = ", ".join(model.name for model in config.models)
        raise InvalidRequest(f"model: unknown deployment {name!r}; one of {known}")
    return found


def _lora(item: str) -> LoraSpec:
    """One `NAME[@STRENGTH]` of a model string as a stack entry."""
    name, at, strength_text = item.rpartition(STRENGTH_SEPARATOR)
    if not at:
        name, strength_text = item, ""
    if not name:
        raise InvalidRequest(f"model: {item!r} names no LoRA")
    try:
        strength = float(strength_text) if strength_text else 1.0
    except ValueError:
        raise InvalidRequest(f"model: {item}: strength {strength_text!r} is not a number") from None
    if not 0.0 <= strength <= 2.0:
        raise InvalidRequest(f"model: {item}: strength {strength} is outside 0.0-2.0")
    file_name = name if name.endswith(LORA_SUFFIX) else name + LORA_SUFFIX
    try:
        return LoraSpec(name=file_name, strength=strength)
    except ValidationError as e:
        raise InvalidRequest(f"model: {item}: {describe_validation_error(e)}") from e


def native_body(request: ImageGenerationRequest, model_loras: list[LoraSpec]) -> dict:
    """The body of the native endpoint that renders the request's first image."""
    loras = [*model_loras, *request.loras]
    if len(loras) > MAX_LORAS_PER_REQUEST:
        raise InvalidRequest(
            f"model, loras: {len(model_loras)} LoRAs in model and {len(request.loras)} in "
            f"loras; at most {MAX_LORAS_PER_REQUEST} in all"
        )
    body = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "steps": request.steps,
        "cfg": request.cfg,
        "seed": request.seed,
        "trigger_word": request.trigger_word,
        "loras": [spec.model_dump(exclude_none=True) for spec in loras],
    }
    if request.size is not None:
        width, height = request.size.split("x")
        body["width"], body["height"] = int(width), int(height)
    return {field: value for field, value in body.items() if value is not None}
