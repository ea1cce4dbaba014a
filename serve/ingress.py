"""The HTTP face: FastAPI under `@serve.ingress`. The only module that knows status codes.

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime, and
Serve rewrites them for the class-based view.
"""

import json
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.family import get_family
from serve.config import AppConfig, ModelConfig
from serve.errors import (
    InvalidRequest,
    LoraplexError,
    LoraRequired,
    NotFound,
    Overloaded,
    TooLarge,
    Unauthorized,
)
from serve.loras.remote import check_url
from serve.loras.store import LoraStore
from serve.media import decode_input_image
from serve.registry import registry_for
from serve.schemas import AdapterUse, EditRequest, GenerationJob, GenerationRequest

STATUS_BY_CODE = {
    "lora_required": 400,
    "unauthorized": 401,
    "lora_not_found": 404,
    "not_found": 404,
    "too_large": 413,
    "lora_incompatible": 422,
    "invalid_request": 422,
    "lora_fetch_failed": 502,
    "overloaded": 503,
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
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"body: not valid JSON ({e})") from e


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
        self.config = AppConfig.model_validate(config)
        self.handles = handles
        self.store = LoraStore(self.config.lora_root)
        self.registry = registry_for(serve.get_replica_context().app_name)
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
        job = self._job_for(model, generation, lora_required)
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
        stack = request.lora_stack()
        if lora_required and not stack:
            raise LoraRequired()
        adapters = []
        for index, spec in enumerate(stack):
            url = None
            if spec.url is not None:
                source = check_url(spec.url, self.config.remote_loras, f"loras.{index}.url")
                ref, url = source.ref, source.url
            else:
                ref = self.store.resolve(spec.file_name)
            if any(use.key == ref.key for use in adapters):
                raise InvalidRequest(f"loras: {ref.name} is listed twice")
            clip = spec.strength if spec.clip_strength is None else spec.clip_strength
            adapters.append(
                AdapterUse(
                    key=ref.key,
                    name=ref.name,
                    url=url,
                    strength=spec.strength,
                    clip_strength=clip,
                )
            )
        defaults = model.generation_defaults()
        image = decode_input_image(request.image) if isinstance(request, EditRequest) else None
        # An edit keeps its input image's size unless the request says otherwise.
        default_width, default_height = (None, None) if image else (defaults.width, defaults.height)
        return GenerationJob(
            prompt=request.prompt_with_triggers(),
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
