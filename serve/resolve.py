"""A generation request's body -> the GenerationJob a replica runs.

Pure request logic, no Serve: the family's defaults, the LoRA short forms and `loras` resolved
in the store (or checked as URLs), `<lora:...>` prompt tags, trigger words, block weights, and
the family's own job check. It reads the LoRA root (names, and headers for "auto" trigger
words), so the ingress calls it off its event loop.
"""

from __future__ import annotations

import secrets

from deployments.blocks import check_group_names
from deployments.config import ModelConfig
from deployments.errors import InvalidRequest, LoraNotFound, LoraRequired
from deployments.family import Family, get_family
from deployments.loras.formats import trigger_words
from deployments.loras.remote import check_url
from deployments.loras.store import LoraStore
from deployments.media import decode_input_image
from deployments.schemas import (
    AUTO_TRIGGER,
    MAX_LORAS_PER_REQUEST,
    AdapterUse,
    EditRequest,
    GenerationJob,
    LoraRef,
    LoraSpec,
)
from serve.config import AppConfig
from serve.prompt_tags import LoraTag, extract_lora_tags, prompt_with_triggers
from serve.tenants import resolve_lora
from serve.validation import validated

MAX_SEED_DRAWN = 2**32  # random seeds stay small enough to type back in


def resolve_job(
    body: object,
    model: ModelConfig,
    *,
    lora_required: bool,
    store: LoraStore,
    config: AppConfig,
    tenant: str | None = None,
) -> GenerationJob:
    """The job for `body` sent to `model`'s endpoint (`lora_required` for its `-lora` form),
    LoRA names as `tenant`'s key sees them (serve/tenants.py). Refusals are typed errors
    naming the field: InvalidRequest, LoraRequired, LoraNotFound."""
    family = get_family(model.family)
    request = validated(family.request_model, body)
    prompt, tags = extract_lora_tags(request.prompt)
    stack = request.lora_stack()
    if lora_required and not stack and not tags:
        raise LoraRequired()
    if len(stack) + len(tags) > MAX_LORAS_PER_REQUEST:
        raise InvalidRequest(
            f"loras: {len(stack)} listed and {len(tags)} <lora:...> tags in the prompt; "
            f"at most {MAX_LORAS_PER_REQUEST} in all"
        )
    adapters, refs = _adapters_for(family, stack, tags, store, config, tenant)
    # Request-level first (it speaks for the whole stack), then each adapter's own.
    triggers = _trigger_words(request.trigger_word, refs, store)
    for spec, ref in zip(stack, refs, strict=False):
        triggers += _trigger_words(spec.trigger_word, [ref], store)
    defaults = model.generation_defaults()
    image = decode_input_image(request.image) if isinstance(request, EditRequest) else None
    # An edit keeps its input image's size unless the request says otherwise.
    default_width, default_height = (None, None) if image else (defaults.width, defaults.height)
    job = GenerationJob(
        prompt=prompt_with_triggers(prompt, triggers),
        negative_prompt=request.negative_prompt,
        width=request.width or default_width,
        height=request.height or default_height,
        steps=request.steps or defaults.steps,
        cfg=defaults.cfg if request.cfg is None else request.cfg,
        seed=secrets.randbelow(MAX_SEED_DRAWN) if request.seed is None else request.seed,
        adapters=adapters,
        length=getattr(request, "length", None) or defaults.length,
        fps=getattr(request, "fps", None) or defaults.fps,
        image=image,
    )
    if family.check_job is not None:
        family.check_job(job)
    return job


def _adapters_for(
    family: Family,
    stack: list[LoraSpec],
    tags: list[LoraTag],
    store: LoraStore,
    config: AppConfig,
    tenant: str | None,
) -> tuple[list[AdapterUse], list[LoraRef]]:
    """The stack's adapters, then the prompt tags', resolved in the store, in order."""
    adapters, refs = [], []
    for index, spec in enumerate(stack):
        url = None
        if spec.url is not None:
            source = check_url(spec.url, config.remote_loras, f"loras.{index}.url")
            ref, url = source.ref, source.url
        else:
            ref = resolve_lora(store, tenant, spec.file_name, config.lora_resolve_cache_s)
        if ref in refs:
            raise InvalidRequest(f"loras: {ref.name} is listed twice")
        if spec.block_weights:
            field = f"loras.{index}.block_weights"
            check_group_names(family.block_groups, spec.block_weights, field, family.name)
        clip = spec.strength if spec.clip_strength is None else spec.clip_strength
        adapters.append(
            AdapterUse(
                ref=ref,
                url=url,
                strength=spec.strength,
                clip_strength=clip,
                block_weights=spec.block_weights or {},
            )
        )
        refs.append(ref)
    for tag in tags:
        ref = _resolve_tag(tag, store, tenant, config.lora_resolve_cache_s)
        if ref in refs:
            raise InvalidRequest(f"prompt: {tag.text}: {ref.name} is already in loras")
        adapters.append(
            AdapterUse(
                ref=ref,
                strength=tag.strength,
                clip_strength=tag.clip_strength,
            )
        )
        refs.append(ref)
    return adapters, refs


def _resolve_tag(tag: LoraTag, store: LoraStore, tenant: str | None, max_age_s: float) -> LoraRef:
    """The first file a prompt tag may mean (NAME.safetensors, then the character LoRA)."""
    for name in tag.file_names():
        try:
            return resolve_lora(store, tenant, name, max_age_s)
        except LoraNotFound:
            continue
    raise LoraNotFound(f"LoRA not found: {tag.name}")


def _trigger_words(trigger_word: str | None, refs: list[LoraRef], store: LoraStore) -> list[str]:
    """The words a `trigger_word` field asks for: itself, or for "auto" the trigger words
    in the metadata of these files (read from their headers only). A URL source's file is
    fetched by the replica, never here, so "auto" adds nothing for it."""
    if trigger_word != AUTO_TRIGGER:
        return [trigger_word] if trigger_word else []
    stored = [ref for ref in refs if "://" not in ref.name]  # store names never hold ://
    return [word for ref in stored for word in trigger_words(store.read_metadata(ref), ref.name)]
