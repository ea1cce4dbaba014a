"""The HTTP face: FastAPI under `@serve.ingress`, and what every route shares.

The routes live in serve/routes/, one APIRouter per concern; this module holds the app they are
included in, API keys and the declared body size (checked before any route runs), and the one
mapping of typed errors to HTTP statuses. Routes raise the errors where they find them; what
no route expected still answers in the same JSON shape, as a 500 `internal`.
"""

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.errors import (
    InvalidRequest,
    LoraplexError,
    ReplicaUnavailable,
    TooLarge,
    Unauthorized,
)
from serve.config import AppConfig
from serve.routes import generation, loras, operations, training
from serve.routes.services import Services, current_services, replica_error
from serve.serve_settings import check_serve_settings
from serve.validation import describe_errors

logger = logging.getLogger("ray.serve")

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
    "replica_unavailable": 503,
    "job_server_unavailable": 503,
}
PUBLIC_PATHS = ("/healthz", "/docs", "/openapi.json")
RETRY_AFTER_S = 1
# What a handle call raises when its replica is gone: the replica's node died (ActorDiedError)
# or cannot be reached (ActorUnavailableError), both RayActorError, or Serve has no replica to
# give. Serve retries a request the replica had not yet accepted; one it had accepted fails with
# these. A retry waits in the handle's queue until Serve has started a replacement.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)

app = FastAPI(
    title="loraplex",
    description="Diffusion models with per-request LoRA adapters, served by Ray Serve.",
    version="0.1.0",
)
# In this order: a router's fixed paths before another's catch-all (`/{endpoint}` last).
app.include_router(operations.router)
app.include_router(loras.router)
app.include_router(training.router)
app.include_router(generation.router)


def _error_response(error: LoraplexError) -> JSONResponse:
    status = STATUS_BY_CODE.get(error.code, 500)
    headers = {}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    body = {"error": {"code": error.code, "message": error.message}}
    return JSONResponse(body, status_code=status, headers=headers)


@app.middleware("http")
async def check_access(request: Request, call_next):
    """API keys and the declared body size, before any route runs. (Serve's proxy sets
    X-Request-Id on every response, honouring one the client sent.)"""
    config = (await current_services()).config
    try:
        if config.api_keys and request.url.path not in PUBLIC_PATHS:
            _check_api_key(request, config.api_keys)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise TooLarge(f"body: {declared} bytes is over the limit of {config.max_body_bytes}")
    except LoraplexError as e:
        return _error_response(e)
    return await call_next(request)


@app.middleware("http")
async def internal_errors(request: Request, call_next):
    """The last resort, outermost: an exception no handler took (a bug, or a library failing
    in a way no route foresaw) is logged with its traceback and answered as JSON, never as
    Starlette's plain-text 500. Typed errors and lost replicas never reach here."""
    try:
        return await call_next(request)
    except Exception:
        logger.exception("%s %s failed unexpectedly", request.method, request.url.path)
        body = {"error": {"code": "internal", "message": "internal error; see the server log"}}
        return JSONResponse(body, status_code=500)


@app.exception_handler(RequestValidationError)
async def invalid_parameters(request: Request, error: RequestValidationError) -> JSONResponse:
    """A query or path parameter FastAPI could not convert (`?offset=abc`), in loraplex's error
    shape rather than FastAPI's `{"detail": [...]}`; the field without its `query.` prefix."""
    errors = [{**item, "loc": tuple(item["loc"])[1:] or item["loc"]} for item in error.errors()]
    return _error_response(InvalidRequest(describe_errors(errors)))


@app.exception_handler(LoraplexError)
async def loraplex_error(request: Request, error: LoraplexError) -> JSONResponse:
    cause = replica_error(error)
    cause = cause if isinstance(cause, LoraplexError) else error
    return _error_response(cause)


async def replica_lost(request: Request, error: Exception) -> JSONResponse:
    """REPLICA_LOST, from any route's handle call, as 503 `replica_unavailable`."""
    where = f"{request.method} {request.url.path}"
    lost = ReplicaUnavailable(
        f"{where}: the replica serving it is gone ({type(error).__name__}); retry shortly"
    )
    return _error_response(lost)


for _lost in REPLICA_LOST:
    app.add_exception_handler(_lost, replica_lost)


def _check_api_key(request: Request, api_keys: list[str]) -> None:
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if not given or not any(secrets.compare_digest(given, key) for key in api_keys):
        raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, handles: dict[str, DeploymentHandle]):
        check_serve_settings()  # here: Serve's settings are this process's, its handles' too
        # The routes find these through serve/routes/services.py's dependency.
        self.services = Services.build(AppConfig.model_validate(config), handles)
