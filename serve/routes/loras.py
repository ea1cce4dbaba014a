"""`/loras`: list, upload (whole or resumable), merge and delete the files under the LoRA root.

A file becomes visible only once a served model has accepted it (its replica loads it as a
check), and only under a name not taken unless the request says overwrite.

Upload routes come first: `/loras/uploads/<id>` would also match `/loras/{name:path}`. Upload ids
never end in .safetensors and names always do, so a file in a sub-folder named `uploads` is still
reachable (the upload routes hand it over).
"""

import asyncio
import posixpath

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from deployments.errors import (
    Conflict,
    InvalidRequest,
    LoraIncompatible,
    TooLarge,
)
from deployments.family import FAMILY_NAMES
from deployments.loras.files import parse_lora_file
from deployments.loras.formats import inspect_lora
from deployments.loras.store import LORA_SUFFIX
from serve import tenants
from serve.auth import CanReadLoras, CanWriteLoras
from serve.config import AppConfig
from serve.loras.merge_request import MergeRequest
from serve.loras.uploads import UploadStart, checked_target, with_metadata
from serve.openapi import RAW_BODY, json_body
from serve.routes.bodies import read_body, read_json
from serve.routes.services import Services, ServicesDep, replica_error
from serve.validation import validated

router = APIRouter()


@router.get("/loras")
async def list_loras(
    services: ServicesDep, principal: CanReadLoras, family: str | None = None
) -> dict:
    """Every file under the LoRA root: size, sha256, format, family, rank, alpha, targets,
    trigger words. `?family=` keeps one family's files. A tenant key sees its own files and
    the shared ones (`shared`)."""
    if family is not None and family not in FAMILY_NAMES:
        raise InvalidRequest(f"family: unknown {family!r}; expected one of {FAMILY_NAMES}")
    entries = await asyncio.to_thread(services.catalog.entries, family)
    return {"loras": tenants.entries_seen(entries, principal.tenant)}


@router.post("/loras/uploads", status_code=201, openapi_extra=json_body(UploadStart))
async def start_upload(request: Request, services: ServicesDep, principal: CanWriteLoras) -> dict:
    """Begin a resumable upload: `{filename, total_size, sha256, metadata}` -> upload_id."""
    start = validated(UploadStart, await read_json(request, services.config.max_body_bytes))
    start.check_metadata()
    _check_family(start.family, services.config)
    target = tenants.owned(principal.tenant, start.filename, "filename")
    await asyncio.to_thread(_check_free, services, target, start.overwrite, "filename")
    state = await asyncio.to_thread(services.uploads.start, start, principal.tenant)
    return services.uploads.describe(state)


@router.get("/loras/uploads/{upload_id}")
async def upload_state(upload_id: str, services: ServicesDep, principal: CanWriteLoras) -> dict:
    """The upload's offset: where an interrupted client resumes."""
    state = await asyncio.to_thread(services.uploads.state, upload_id, principal.tenant)
    return services.uploads.describe(state)


# A 201 for a file named `uploads/<name>.safetensors`, which PUT /loras/{name} publishes.
@router.put(
    "/loras/uploads/{upload_id}",
    openapi_extra=RAW_BODY,
    responses={
        201: {
            "description": "A LoRA file published (a name ending .safetensors).",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def upload_chunk(
    upload_id: str,
    request: Request,
    services: ServicesDep,
    principal: CanWriteLoras,
    offset: int | None = None,
    family: str | None = None,
    overwrite: bool = False,
) -> Response:
    """One chunk at `?offset=N`, which must equal the bytes received so far (409 with the
    expected offset otherwise). A chunk is one request body, so at most max_body_bytes."""
    if upload_id.endswith(LORA_SUFFIX):
        name = f"uploads/{upload_id}"
        entry = await put_lora(name, request, services, principal, family, overwrite)
        return JSONResponse(entry, status_code=201)
    if offset is None:
        raise InvalidRequest("offset: required (the bytes received so far)")
    chunk = await read_body(request, services.config.max_body_bytes)
    append = services.uploads.append
    state = await asyncio.to_thread(append, upload_id, offset, chunk, principal.tenant)
    return JSONResponse(services.uploads.describe(state))


@router.post("/loras/uploads/{upload_id}/complete", status_code=201)
async def complete_upload(upload_id: str, services: ServicesDep, principal: CanWriteLoras) -> dict:
    """Check size and sha256, merge the upload's metadata into the file, validate the file as
    it will be published, publish atomically. Once the bytes are whole, the upload ends here
    either way: a refusal publishes nothing and removes what was staged. It publishes into
    the folder of the tenant that began it."""
    assemble = services.uploads.assemble
    state, data = await asyncio.to_thread(assemble, upload_id, principal.tenant)
    start = state.start
    target = tenants.owned(state.tenant, start.filename, "filename")
    try:
        data = with_metadata(data, start.file_metadata(), start.filename)
        await _validate(services, data, start.filename, start.family)
        entry = await _publish(services, data, target, start.overwrite, "filename")
        return _as_seen(entry, state.tenant)
    finally:
        await asyncio.to_thread(services.uploads.remove, upload_id)


@router.delete("/loras/uploads/{upload_id}")
async def abort_upload(upload_id: str, services: ServicesDep, principal: CanWriteLoras) -> dict:
    """Abandon an upload and remove what it staged."""
    if upload_id.endswith(LORA_SUFFIX):
        return await delete_lora(f"uploads/{upload_id}", services, principal)
    # 404 when unknown, or another tenant's
    await asyncio.to_thread(services.uploads.state, upload_id, principal.tenant)
    await asyncio.to_thread(services.uploads.remove, upload_id)
    return {"aborted": upload_id}


@router.post("/loras/merge", status_code=201, openapi_extra=json_body(MergeRequest))
async def merge_loras(request: Request, services: ServicesDep, principal: CanWriteLoras) -> dict:
    """`{inputs: [{name, ratio}], output}`: one file that, at strength 1, applies what the
    stack of the inputs at their ratios does. A tenant key merges what it may read into its
    own folder."""
    config, store, catalog = services.config, services.store, services.catalog
    tenant = principal.tenant
    merge = validated(MergeRequest, await read_json(request, config.max_body_bytes))
    _check_family(merge.family, config)
    output = tenants.owned(tenant, merge.output, "output")
    await asyncio.to_thread(_check_free, services, output, merge.overwrite, "output")
    refs = [
        await asyncio.to_thread(tenants.resolve_lora, store, tenant, item.name)
        for item in merge.inputs
    ]
    entries = [await asyncio.to_thread(catalog.entry_of, ref) for ref in refs]
    for entry in entries:
        if entry["error"]:
            raise LoraIncompatible(entry["error"])
    detected = [(e["name"], e["family"]) for e in entries if e["family"]]
    for name, family in detected[1:]:
        if family != detected[0][1]:
            raise InvalidRequest(
                f"inputs: {detected[0][0]} is a {detected[0][1]} LoRA and {name} a {family} "
                "LoRA; merge files of one family"
            )
    trigger_words = list(dict.fromkeys(w for e in entries for w in e["trigger_words"]))
    inputs = [(ref.key, item.ratio) for ref, item in zip(refs, merge.inputs, strict=True)]
    data = await _on_compatible_model(
        services,
        merge.family or (detected[0][1] if detected else None),
        merge.output,
        lambda handle: handle.merge_loras.remote(inputs, trigger_words),
    )
    if len(data) > config.max_lora_bytes:
        raise TooLarge(
            f"output: the merged file is {len(data)} bytes, over the limit of "
            f"{config.max_lora_bytes}"
        )
    entry = await _publish(services, data, output, merge.overwrite, "output")
    return _as_seen(entry, tenant)


@router.put("/loras/{name:path}", status_code=201, openapi_extra=RAW_BODY)
async def put_lora(
    name: str,
    request: Request,
    services: ServicesDep,
    principal: CanWriteLoras,
    family: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Upload one file (the body, at most max_body_bytes). It becomes visible only once
    validated; `?family=` validates against that family, `?overwrite=true` replaces. A
    tenant key writes into its own folder."""
    name = checked_target(name, "name")
    target = tenants.owned(principal.tenant, name)
    _check_family(family, services.config)
    await asyncio.to_thread(_check_free, services, target, overwrite, "name")
    limit = min(services.config.max_body_bytes, services.config.max_lora_bytes)
    data = await read_body(request, limit)
    await _validate(services, data, name, family)
    entry = await _publish(services, data, target, overwrite, "name")
    return _as_seen(entry, principal.tenant)


@router.delete("/loras/{name:path}")
async def delete_lora(name: str, services: ServicesDep, principal: CanWriteLoras) -> dict:
    """Remove a file (404 when absent). Requests naming it afterwards get 404. A tenant key
    removes its own files only (403 for a shared one)."""
    name = checked_target(name, "name")  # a name no PUT could write is a 422, as for PUT
    await asyncio.to_thread(tenants.delete_lora, services.store, principal.tenant, name)
    return {"deleted": name}


def _check_family(family: str | None, config: AppConfig) -> None:
    if family is None:
        return
    if family not in FAMILY_NAMES:
        raise InvalidRequest(f"family: unknown {family!r}; expected one of {FAMILY_NAMES}")
    if not any(model.family == family for model in config.models):
        raise InvalidRequest(f"family: no {family} model is served here")


def _check_free(services: Services, name: str, overwrite: bool, field: str) -> None:
    if not overwrite and services.store.exists(name):
        # The name's last part: a tenant key's file is named within its folder.
        shown = posixpath.basename(name)
        raise Conflict(f"{field}: {shown} already exists; set overwrite=true to replace it")


def _as_seen(entry: dict, tenant: str | None) -> dict:
    """A listing entry of a file just written, named as the key that wrote it sees it."""
    return {**entry, "name": tenants.shown(tenant, entry["name"])}


async def _validate(services: Services, data: bytes, name: str, family: str | None) -> None:
    """Accept the file only if a served model takes it: the pinned family's, else the
    detected family's, else the first model of any family whose keys it matches."""
    detected = await asyncio.to_thread(_detected_family, data, name)
    await _on_compatible_model(
        services, family or detected, name, lambda handle: handle.check_lora.remote(data, name)
    )


def _detected_family(data: bytes, name: str) -> str | None:
    """The family the file states or its keys show; LoraIncompatible for a file whose
    metadata or tensors no load could use. Off the event loop: parsing and checking a large
    file takes a good part of a second, and every other request would wait for it."""
    tensors, metadata = parse_lora_file(data, name)
    return inspect_lora(tensors, metadata, name).family


async def _on_compatible_model(services: Services, family: str | None, name: str, call):
    """`call(handle)` on the first model of `family` (any model when None) that does not
    refuse the file(s) as incompatible; the refusal when every one does."""
    models = [m for m in services.config.models if family is None or m.family == family]
    if not models:
        raise LoraIncompatible(
            f"Failed to load LoRA: {name}: a {family} LoRA, and no {family} model is served"
        )
    refusals = []
    for model in models:
        try:
            return await call(services.handles[model.name])
        except LoraIncompatible as e:
            refusals.append(replica_error(e))
    if len(refusals) == 1:
        raise refusals[0]
    tried = ", ".join(model.name for model in models)
    raise LoraIncompatible(
        f"Failed to load LoRA: {name}: no served model accepts it (tried {tried}); "
        f"{models[0].name}: {refusals[0].message.split(': ', 2)[-1]}"
    )


async def _publish(services: Services, data: bytes, name: str, overwrite: bool, field: str) -> dict:
    await asyncio.to_thread(_check_free, services, name, overwrite, field)
    ref = await asyncio.to_thread(services.store.write, name, data)
    return await asyncio.to_thread(services.catalog.remember, ref, data)
