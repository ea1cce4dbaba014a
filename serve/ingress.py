"""The HTTP face: FastAPI under `@serve.ingress`. The only module that knows status codes.

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime, and
Serve rewrites them for the class-based view.
"""

import asyncio
import json
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from cluster.train.config import TrainJob
from deployments.blocks import check_group_names
from deployments.config import ModelConfig
from deployments.errors import (
    Conflict,
    InvalidRequest,
    LoraIncompatible,
    LoraNotFound,
    LoraplexError,
    LoraRequired,
    NotFound,
    Overloaded,
    TooLarge,
    Unauthorized,
)
from deployments.family import FAMILY_NAMES, Family, get_family
from deployments.loras.files import parse_lora_file
from deployments.loras.formats import inspect_lora, trigger_words
from deployments.loras.remote import check_url
from deployments.loras.store import LORA_SUFFIX, LoraRef, LoraStore
from deployments.media import decode_input_image
from deployments.schemas import (
    AUTO_TRIGGER,
    MAX_LORAS_PER_REQUEST,
    AdapterUse,
    EditRequest,
    GenerationJob,
    GenerationRequest,
    LoraSpec,
)
from serve.config import AppConfig
from serve.loras.catalog import Catalog
from serve.loras.merge_request import MergeRequest
from serve.loras.uploads import Uploads, UploadStart, checked_target, with_metadata
from serve.prompt_tags import LoraTag, extract_lora_tags, prompt_with_triggers
from serve.registry import registry_for
from serve.serve_settings import check_serve_settings
from serve.training import (
    MAX_DATASET_IMAGES,
    Datasets,
    DatasetUpload,
    TrainingJobs,
    check_dataset_name,
    new_job_id,
)

STATUS_BY_CODE = {
    "lora_required": 400,
    "unauthorized": 401,
    "lora_not_found": 404,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "lora_incompatible": 422,
    "invalid_request": 422,
    "lora_fetch_failed": 502,
    "overloaded": 503,
    "job_server_unavailable": 503,
}
PUBLIC_PATHS = ("/healthz", "/docs", "/openapi.json")
RETRY_AFTER_S = 1
MAX_SEED_DRAWN = 2**32  # random seeds stay small enough to type back in

app = FastAPI(
    title="loraplex",
    description="Diffusion models with per-request LoRA adapters, served by Ray Serve.",
    version="0.1.0",
)


def _error_response(error: LoraplexError) -> JSONResponse:
    status = STATUS_BY_CODE.get(error.code, 500)
    headers = {}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    body = {"error": {"code": error.code, "message": error.message}}
    return JSONResponse(body, status_code=status, headers=headers)


def _unwrap(error: Exception) -> Exception:
    # An error raised in a replica arrives as Ray's RayTaskError subclass of the same type;
    # `cause` is the original, whose str() is the message without Ray's traceback.
    return getattr(error, "cause", None) or error


@app.middleware("http")
async def check_access(request: Request, call_next):
    """API keys and the declared body size, before any route runs. (Serve's proxy sets
    X-Request-Id on every response, honouring one the client sent.)"""
    config: AppConfig = request.app.state.config
    try:
        if config.api_keys and request.url.path not in PUBLIC_PATHS:
            _check_api_key(request, config.api_keys)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise TooLarge(f"body: {declared} bytes is over the limit of {config.max_body_bytes}")
    except LoraplexError as e:
        return _error_response(e)
    return await call_next(request)


@app.exception_handler(LoraplexError)
async def loraplex_error(request: Request, error: LoraplexError) -> JSONResponse:
    cause = _unwrap(error)
    cause = cause if isinstance(cause, LoraplexError) else error
    return _error_response(cause)


def _check_api_key(request: Request, api_keys: list[str]) -> None:
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if not given or not any(secrets.compare_digest(given, key) for key in api_keys):
        raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")


# Helpers sit above the class: Serve captures the class when it is decorated.
_GENERATION_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": GenerationRequest.model_json_schema()}},
    },
    "responses": {"200": {"description": "The generated media, with cost headers."}},
}


async def _read_json(request: Request, max_bytes: int) -> object:
    body = await request.body()
    if len(body) > max_bytes:
        raise TooLarge(f"body: {len(body)} bytes is over the limit of {max_bytes}")
    return _parse_json(body)


def _parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"body: not valid JSON ({e})") from e


async def _form_parts(request: Request, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """A multipart body (already read within the limit) as (field, file name or None, bytes)."""

    async def stream():
        yield body

    parser = MultiPartParser(
        request.headers,
        stream(),
        max_files=2 * MAX_DATASET_IMAGES,
        max_fields=2 * MAX_DATASET_IMAGES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InvalidRequest(f"body: not valid multipart ({e.message})") from e
    parts = []
    for field, value in form.multi_items():
        if isinstance(value, UploadFile):
            parts.append((field, value.filename or field, await value.read()))
        else:
            parts.append((field, None, value.encode()))
    await form.close()
    return parts


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused as soon as it passes `max_bytes` (a chunked body declares no
    length for the middleware to check)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"body: over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validated(model, body: object):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise InvalidRequest(_describe_validation_error(e)) from e


def _describe_validation_error(error: ValidationError) -> str:
    """`field: problem` for each error, the field as a dotted path (loras.0.strength)."""
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{field}: {item['msg']}")
    return "; ".join(parts)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, handles: dict[str, DeploymentHandle]):
        check_serve_settings()  # here: Serve's settings are this process's, its handles' too
        self.config = AppConfig.model_validate(config)
        self.handles = handles
        self.store = LoraStore(self.config.lora_root)
        self.catalog = Catalog(self.store)
        self.uploads = Uploads(self.store, self.config.max_lora_bytes, self.config.upload_expiry_s)
        self.registry = registry_for(serve.get_replica_context().app_name)
        self.datasets = Datasets(self.config.dataset_root)
        self.training = TrainingJobs(self.config)
        app.state.config = self.config

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/models")
    async def models(self) -> dict:
        """Each deployment: family, model URI, endpoints, replicas and their hot adapters."""
        replicas = await self.registry.snapshot.remote()
        return {
            "models": [
                {
                    "name": model.name,
                    "family": model.family,
                    "model_uri": model.model_uri,
                    "endpoints": [f"/{model.endpoint}", f"/{model.endpoint}-lora"],
                    "max_adapters_per_replica": model.max_adapters_per_replica,
                    "replicas": [r for r in replicas if r["deployment"] == model.name],
                }
                for model in self.config.models
            ]
        }

    # LoRA files. Upload routes come first: `/loras/uploads/<id>` would also match
    # `/loras/{name:path}`. Upload ids never end in .safetensors and names always do, so a file
    # in a sub-folder named `uploads` is still reachable (the upload routes hand it over).

    @app.get("/loras")
    async def list_loras(self, family: str | None = None) -> dict:
        """Every file under the LoRA root: size, sha256, format, family, rank, alpha, targets,
        trigger words. `?family=` keeps one family's files."""
        if family is not None and family not in FAMILY_NAMES:
            raise InvalidRequest(f"family: unknown {family!r}; expected one of {FAMILY_NAMES}")
        return {"loras": await asyncio.to_thread(self.catalog.entries, family)}

    @app.post("/loras/uploads", status_code=201)
    async def start_upload(self, request: Request) -> dict:
        """Begin a resumable upload: `{filename, total_size, sha256, metadata}` -> upload_id."""
        start = _validated(UploadStart, await _read_json(request, self.config.max_body_bytes))
        self._check_family(start.family)
        await asyncio.to_thread(self._check_free, start.filename, start.overwrite, "filename")
        state = await asyncio.to_thread(self.uploads.start, start)
        return self.uploads.describe(state)

    @app.get("/loras/uploads/{upload_id}")
    async def upload_state(self, upload_id: str) -> dict:
        """The upload's offset: where an interrupted client resumes."""
        return self.uploads.describe(await asyncio.to_thread(self.uploads.state, upload_id))

    @app.put("/loras/uploads/{upload_id}")
    async def upload_chunk(
        self,
        upload_id: str,
        request: Request,
        offset: int | None = None,
        family: str | None = None,
        overwrite: bool = False,
    ) -> Response:
        """One chunk at `?offset=N`, which must equal the bytes received so far (409 with the
        expected offset otherwise). A chunk is one request body, so at most max_body_bytes."""
        if upload_id.endswith(LORA_SUFFIX):
            entry = await self.put_lora(f"uploads/{upload_id}", request, family, overwrite)
            return JSONResponse(entry, status_code=201)
        if offset is None:
            raise InvalidRequest("offset: required (the bytes received so far)")
        chunk = await _read_body(request, self.config.max_body_bytes)
        state = await asyncio.to_thread(self.uploads.append, upload_id, offset, chunk)
        return JSONResponse(self.uploads.describe(state))

    @app.post("/loras/uploads/{upload_id}/complete", status_code=201)
    async def complete_upload(self, upload_id: str) -> dict:
        """Check size and sha256, validate against the family's model, publish atomically.
        Any refusal discards the upload: nothing is published."""
        state, data = await asyncio.to_thread(self.uploads.assemble, upload_id)
        start = state.start
        try:
            await self._validate(data, start.filename, start.family)
            data = with_metadata(data, start.file_metadata(), start.filename)
            entry = await self._publish(data, start.filename, start.overwrite, "filename")
        except LoraplexError:
            await asyncio.to_thread(self.uploads.remove, upload_id)
            raise
        await asyncio.to_thread(self.uploads.remove, upload_id)
        return entry

    @app.delete("/loras/uploads/{upload_id}")
    async def abort_upload(self, upload_id: str) -> dict:
        """Abandon an upload and remove what it staged."""
        if upload_id.endswith(LORA_SUFFIX):
            return await self.delete_lora(f"uploads/{upload_id}")
        await asyncio.to_thread(self.uploads.state, upload_id)  # 404 when unknown
        await asyncio.to_thread(self.uploads.remove, upload_id)
        return {"aborted": upload_id}

    @app.post("/loras/merge", status_code=201)
    async def merge_loras(self, request: Request) -> dict:
        """`{inputs: [{name, ratio}], output}`: one file that, at strength 1, applies what the
        stack of the inputs at their ratios does."""
        merge = _validated(MergeRequest, await _read_json(request, self.config.max_body_bytes))
        self._check_family(merge.family)
        await asyncio.to_thread(self._check_free, merge.output, merge.overwrite, "output")
        refs = [await asyncio.to_thread(self.store.resolve, item.name) for item in merge.inputs]
        entries = [await asyncio.to_thread(self.catalog.entry_of, ref) for ref in refs]
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
        data = await self._on_compatible_model(
            merge.family or (detected[0][1] if detected else None),
            merge.output,
            lambda handle: handle.merge_loras.remote(inputs, trigger_words),
        )
        if len(data) > self.config.max_lora_bytes:
            raise TooLarge(
                f"output: the merged file is {len(data)} bytes, over the limit of "
                f"{self.config.max_lora_bytes}"
            )
        return await self._publish(data, merge.output, merge.overwrite, "output")

    @app.put("/loras/{name:path}", status_code=201)
    async def put_lora(
        self,
        name: str,
        request: Request,
        family: str | None = None,
        overwrite: bool = False,
    ) -> dict:
        """Upload one file (the body, at most max_body_bytes). It becomes visible only once
        validated; `?family=` validates against that family, `?overwrite=true` replaces."""
        name = checked_target(name, "name")
        self._check_family(family)
        await asyncio.to_thread(self._check_free, name, overwrite, "name")
        limit = min(self.config.max_body_bytes, self.config.max_lora_bytes)
        data = await _read_body(request, limit)
        await self._validate(data, name, family)
        return await self._publish(data, name, overwrite, "name")

    @app.delete("/loras/{name:path}")
    async def delete_lora(self, name: str) -> dict:
        """Remove a file (404 when absent). Requests naming it afterwards get 404."""
        ref = await asyncio.to_thread(self.store.delete, name)
        return {"deleted": ref.name}

    # Training (serve/training.py). Above the generation route: `/train` would match
    # `/{endpoint}`.

    @app.put("/datasets/{name:path}", status_code=201)
    async def put_dataset(self, name: str, request: Request) -> dict:
        """A whole dataset, replacing any of that name: JSON `{images: [{filename, content
        (base64), caption}]}`, or multipart image files with `<stem>.txt` captions (files or
        fields). Stored as `<stem>.png` + `<stem>.txt`; every image is decoded first."""
        check_dataset_name(name)
        body = await _read_body(request, self.config.max_body_bytes)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            parts = await _form_parts(request, body)
            pairs = await asyncio.to_thread(self.datasets.pairs_from_form, parts)
        else:
            upload = _validated(DatasetUpload, _parse_json(body))
            pairs = await asyncio.to_thread(self.datasets.pairs_from_json, upload)
        return await asyncio.to_thread(self.datasets.write, name, pairs)

    @app.get("/datasets/{name:path}")
    async def get_dataset(self, name: str) -> dict:
        """The dataset's images with their sizes and captions."""
        return await asyncio.to_thread(self.datasets.describe, name)

    @app.post("/train", status_code=202)
    async def start_training(self, request: Request) -> dict:
        """Validate a TrainJob (refusals name the field; the dataset is checked too) and
        submit it as a Ray job: 202 `{job_id, status_url}`."""
        job_id = new_job_id()
        body = await _read_json(request, self.config.max_body_bytes)
        job = _validated(TrainJob, self.training.job_fields(body, job_id))
        await asyncio.to_thread(self.training.check, job)
        return await asyncio.to_thread(self.training.submit, job_id, job)

    @app.get("/train")
    async def list_training(self) -> dict:
        """Every training job the cluster knows, newest first."""
        return {"jobs": await asyncio.to_thread(self.training.list)}

    @app.get("/train/{job_id}")
    async def training_status(self, job_id: str) -> dict:
        """State (Ray's), step, total steps, loss, lr, ETA, checkpoints, sample URLs, LoRA."""
        return await asyncio.to_thread(self.training.status, job_id)

    @app.get("/train/{job_id}/logs", response_class=PlainTextResponse)
    async def training_logs(self, job_id: str, lines: int = 200) -> PlainTextResponse:
        """The last `lines` lines of the job's log (Ray's job log)."""
        if not 1 <= lines <= 100_000:
            raise InvalidRequest("lines: between 1 and 100000")
        return PlainTextResponse(await asyncio.to_thread(self.training.logs, job_id, lines))

    @app.get("/train/{job_id}/loss.png", response_class=Response)
    async def training_loss(self, job_id: str) -> Response:
        data = await asyncio.to_thread(self.training.run_file, job_id, "loss.png")
        return Response(data, media_type="image/png")

    @app.get("/train/{job_id}/samples/{filename}", response_class=Response)
    async def training_sample(self, job_id: str, filename: str) -> Response:
        data = await asyncio.to_thread(self.training.sample, job_id, filename)
        return Response(data, media_type="image/png")

    @app.delete("/train/{job_id}")
    async def stop_training(self, job_id: str) -> dict:
        """Stop a running job (it publishes nothing) and wait for Ray to confirm; for a job
        that already ended, forget it and its run folder (never its published LoRA)."""
        return await asyncio.to_thread(self.training.stop, job_id)

    @app.post("/{endpoint}", openapi_extra=_GENERATION_BODY, response_class=Response)
    async def generate(self, endpoint: str, request: Request) -> Response:
        """Generate with the endpoint's model. `<model>-lora` endpoints require a LoRA."""
        found = self.config.model_for_endpoint(endpoint)
        if found is None:
            raise NotFound(f"no endpoint /{endpoint}")
        model, lora_required = found
        body = await _read_json(request, self.config.max_body_bytes)
        try:
            generation = get_family(model.family).request_model.model_validate(body)
        except ValidationError as e:
            raise InvalidRequest(_describe_validation_error(e)) from e
        # Off the event loop: resolving names reads the LoRA root (on an object store, a
        # request per file; "auto" trigger words read file headers), which would hold up every
        # other request this ingress replica is serving meanwhile.
        job = await asyncio.to_thread(self._job_for, model, generation, lora_required)
        family = get_family(model.family)
        if family.check_job is not None:
            family.check_job(job)
        handle = self.handles[model.name]
        if job.adapters:
            handle = handle.options(multiplexed_model_id=job.adapters[0].key)
        try:
            result = await handle.generate.remote(job)
        except BackPressureError as e:
            raise Overloaded(f"{model.name} is at capacity; retry shortly") from e
        headers = {
            "X-Seed": str(job.seed),
            "X-Model": model.name,
            "X-Inference-Ms": f"{result.inference_ms:.1f}",
            "X-GPU-Seconds": f"{result.gpu_seconds:.4f}",
            "X-Cost-USD": f"{result.cost_usd:.6f}",
        }
        if result.lora_cache:
            headers["X-LoRA-Cache"] = ",".join(result.lora_cache)
        return Response(result.content, media_type=result.media_type, headers=headers)

    def _job_for(
        self, model: ModelConfig, request: GenerationRequest, lora_required: bool
    ) -> GenerationJob:
        prompt, tags = extract_lora_tags(request.prompt)
        stack = request.lora_stack()
        if lora_required and not stack and not tags:
            raise LoraRequired()
        if len(stack) + len(tags) > MAX_LORAS_PER_REQUEST:
            raise InvalidRequest(
                f"loras: {len(stack)} listed and {len(tags)} <lora:...> tags in the prompt; "
                f"at most {MAX_LORAS_PER_REQUEST} in all"
            )
        adapters, refs = self._adapters_for(get_family(model.family), stack, tags)
        # Request-level first (it speaks for the whole stack), then each adapter's own.
        triggers = self._trigger_words(request.trigger_word, refs)
        for spec, ref in zip(stack, refs, strict=False):
            triggers += self._trigger_words(spec.trigger_word, [ref])
        defaults = model.generation_defaults()
        image = decode_input_image(request.image) if isinstance(request, EditRequest) else None
        # An edit keeps its input image's size unless the request says otherwise.
        default_width, default_height = (None, None) if image else (defaults.width, defaults.height)
        return GenerationJob(
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

    def _adapters_for(
        self, family: Family, stack: list[LoraSpec], tags: list[LoraTag]
    ) -> tuple[list[AdapterUse], list[LoraRef]]:
        """The stack's adapters, then the prompt tags', resolved in the store, in order."""
        adapters, refs = [], []
        for index, spec in enumerate(stack):
            url = None
            if spec.url is not None:
                source = check_url(spec.url, self.config.remote_loras, f"loras.{index}.url")
                ref, url = source.ref, source.url
            else:
                ref = self.store.resolve(spec.file_name, self.config.lora_resolve_cache_s)
            if ref in refs:
                raise InvalidRequest(f"loras: {ref.name} is listed twice")
            if spec.block_weights:
                field = f"loras.{index}.block_weights"
                check_group_names(family.block_groups, spec.block_weights, field, family.name)
            clip = spec.strength if spec.clip_strength is None else spec.clip_strength
            adapters.append(
                AdapterUse(
                    key=ref.key,
                    name=ref.name,
                    url=url,
                    strength=spec.strength,
                    clip_strength=clip,
                    block_weights=spec.block_weights or {},
                )
            )
            refs.append(ref)
        for tag in tags:
            ref = self._resolve_tag(tag)
            if ref in refs:
                raise InvalidRequest(f"prompt: {tag.text}: {ref.name} is already in loras")
            adapters.append(
                AdapterUse(
                    key=ref.key,
                    name=ref.name,
                    strength=tag.strength,
                    clip_strength=tag.clip_strength,
                )
            )
            refs.append(ref)
        return adapters, refs

    def _resolve_tag(self, tag: LoraTag) -> LoraRef:
        """The first file a prompt tag may mean (NAME.safetensors, then the character LoRA)."""
        for name in tag.file_names():
            try:
                return self.store.resolve(name, self.config.lora_resolve_cache_s)
            except LoraNotFound:
                continue
        raise LoraNotFound(f"LoRA not found: {tag.name}")

    def _trigger_words(self, trigger_word: str | None, refs: list[LoraRef]) -> list[str]:
        """The words a `trigger_word` field asks for: itself, or for "auto" the trigger words
        in the metadata of these files (read from their headers only). A URL source's file is
        fetched by the replica, never here, so "auto" adds nothing for it."""
        if trigger_word != AUTO_TRIGGER:
            return [trigger_word] if trigger_word else []
        stored = [ref for ref in refs if "://" not in ref.name]  # store names never hold ://
        return [word for ref in stored for word in trigger_words(self.store.read_metadata(ref))]

    def _check_family(self, family: str | None) -> None:
        if family is None:
            return
        if family not in FAMILY_NAMES:
            raise InvalidRequest(f"family: unknown {family!r}; expected one of {FAMILY_NAMES}")
        if not any(model.family == family for model in self.config.models):
            raise InvalidRequest(f"family: no {family} model is served here")

    def _check_free(self, name: str, overwrite: bool, field: str) -> None:
        if not overwrite and self.store.exists(name):
            raise Conflict(f"{field}: {name} already exists; set overwrite=true to replace it")

    async def _validate(self, data: bytes, name: str, family: str | None) -> None:
        """Accept the file only if a served model takes it: the pinned family's, else the
        detected family's, else the first model of any family whose keys it matches."""
        tensors, metadata = await asyncio.to_thread(parse_lora_file, data, name)
        detected = inspect_lora(tensors, metadata).family
        await self._on_compatible_model(
            family or detected, name, lambda handle: handle.check_lora.remote(data, name)
        )

    async def _on_compatible_model(self, family: str | None, name: str, call):
        """`call(handle)` on the first model of `family` (any model when None) that does not
        refuse the file(s) as incompatible; the refusal when every one does."""
        models = [m for m in self.config.models if family is None or m.family == family]
        if not models:
            raise LoraIncompatible(
                f"Failed to load LoRA: {name}: a {family} LoRA, and no {family} model is served"
            )
        refusals = []
        for model in models:
            try:
                return await call(self.handles[model.name])
            except LoraIncompatible as e:
                refusals.append(_unwrap(e))
        if len(refusals) == 1:
            raise refusals[0]
        tried = ", ".join(model.name for model in models)
        raise LoraIncompatible(
            f"Failed to load LoRA: {name}: no served model accepts it (tried {tried}); "
            f"{models[0].name}: {refusals[0].message.split(': ', 2)[-1]}"
        )

    async def _publish(self, data: bytes, name: str, overwrite: bool, field: str) -> dict:
        await asyncio.to_thread(self._check_free, name, overwrite, field)
        ref = await asyncio.to_thread(self.store.write, name, data)
        return await asyncio.to_thread(self.catalog.remember, ref, data)
