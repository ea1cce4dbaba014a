"""The HTTP face: FastAPI under `@serve.ingress`, and what every route shares.

The routes live in serve/routes/, one APIRouter per concern; this module holds the app they are
included in, admission (at most back_pressure.ingress_max_ongoing_requests at once), API keys
and the declared body size (checked before any route runs), and the one mapping of typed
errors to HTTP statuses. Routes raise the errors where they find them; Starlette's own 404s
and 405s and what no route expected answer in the same JSON shape. The API description
(serve/openapi.py) declares each route's body and errors.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from deployments.errors import (
    InvalidRequest,
    LoraplexError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    ReplicaUnavailable,
    TooLarge,
)
from serve.auth import principal_of
from serve.config import AppConfig
from serve.openapi import describe_api, error_responses
from serve.queue.worker import QueueWorker
from serve.routes import generation, loras, openai_images, operations, playground, queue, training
from serve.routes.services import REPLICA_LOST, Services, current_services, replica_error
from serve.serve_settings import check_serve_settings
from serve.validation import describe_errors

logger = logging.getLogger("ray.serve")

STATUS_BY_CODE = {
    "lora_required": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "lora_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "too_large": 413,
    "lora_incompatible": 422,
    "invalid_request": 422,
    "lora_fetch_failed": 502,
    "overloaded": 503,
    "replica_unavailable": 503,
    "job_server_unavailable": 503,
}
PUBLIC_PATHS = ("/healthz", "/openapi.json", *playground.PAGES)
# The pages' scripts and styles (serve/routes/playground.py); no key, as a browser sends none.
PUBLIC_PREFIXES = (f"{playground.PLAYGROUND_ASSETS}/", f"{playground.DOCS_ASSETS}/")
RETRY_AFTER_S = 1

app = FastAPI(
    title="loraplex",
    description="Diffusion models with per-request LoRA adapters, served by Ray Serve.",
    version="0.1.0",
    # Served by serve/routes/playground.py from assets the ingress holds, not from a CDN.
    docs_url=None,
    redoc_url=None,
)
# In this order: a router's fixed paths before another's catch-all (`/{endpoint}` last).
# Each declares the error statuses its routes can answer, with loraplex's error body.
app.include_router(operations.router, responses=error_responses())
app.include_router(playground.router, responses=error_responses())
playground.mount_assets(app)
app.include_router(loras.router, responses=error_responses(409))
app.include_router(training.router, responses=error_responses(409))
app.include_router(queue.router, responses=error_responses(400, 409, 502))
app.include_router(openai_images.router, responses=error_responses(400, 502))
app.include_router(generation.router, responses=error_responses(400, 502))


def openapi_description() -> dict:
    """The description of the app this replica serves, built once: its generation paths are
    the configured endpoints (serve/openapi.py)."""
    if app.openapi_schema is None:
        config = serve.get_replica_context().servable_object.services.config
        app.openapi_schema = describe_api(app, config)
    return app.openapi_schema


app.openapi = openapi_description
# Requests one ingress replica works on (see `admit`); Serve hands it REFUSAL_HEADROOM more,
# which it refuses at once: cheap, as a refusal reads no body.
_in_flight = 0
REFUSAL_HEADROOM = 1024


def _error_response(error: LoraplexError) -> JSONResponse:
    status = STATUS_BY_CODE.get(error.code, 500)
    headers = {}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    body = {"error": {"code": error.code, "message": error.message}}
    return JSONResponse(body, status_code=status, headers=headers)


class Gate:
    """What runs before any route, outermost first: the last resort for what no handler took
    (`internal_errors`), admission (`admit`), then API keys and the declared body size
    (`check_access`). A plain ASGI middleware: as three `@app.middleware("http")` functions
    (Starlette's BaseHTTPMiddleware, which runs the rest of the app in a task of its own and
    streams the response through a channel) they took the ingress's work on a generation from
    0.8-1.6 ms to 3.1-3.9 ms on the 2-core machine (docs/benchmarks.md, HTTP against in
    process)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.internal_errors(scope, receive, send)

    async def internal_errors(self, scope, receive, send):
        """An exception no handler took (a bug, or a library failing in a way no route
        foresaw) is logged with its traceback and answered as JSON, never as Starlette's
        plain-text 500. Typed errors and lost replicas never reach here."""
        started = False

        async def send_tracked(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await self.admit(scope, receive, send_tracked)
        except Exception:
            if started:  # too late for another answer: the server ends the response
                raise
            request = Request(scope)
            logger.exception("%s %s failed unexpectedly", request.method, request.url.path)
            body = {"error": {"code": "internal", "message": "internal error; see the server log"}}
            await JSONResponse(body, status_code=500)(scope, receive, send)

    async def admit(self, scope, receive, send):
        """At most `back_pressure.ingress_max_ongoing_requests` at once; one more is answered
        503 `overloaded` at once. Serve's max_ongoing_requests for the ingress is
        REFUSAL_HEADROOM above it (serve/app.py), so a burst is refused here, in loraplex's
        error shape, and waits in Serve's proxy only while refusals cannot keep up."""
        global _in_flight
        request = Request(scope)
        if request.url.path == "/healthz":  # liveness, whatever the load
            await self.check_access(request, receive, send)
            return
        limit = (await current_services()).config.back_pressure.ingress_max_ongoing_requests
        if _in_flight >= limit:
            where = f"{request.method} {request.url.path}"
            refusal = Overloaded(
                f"{where}: the ingress is at capacity ({limit} requests); retry shortly"
            )
            await _error_response(refusal)(scope, receive, send)
            return
        _in_flight += 1
        try:
            await self.check_access(request, receive, send)
        finally:
            _in_flight -= 1

    async def check_access(self, request: Request, receive, send):
        """API keys and the declared body size, before any route runs. (Serve's proxy sets
        X-Request-Id on every response, honouring one the client sent.)"""
        config = (await current_services()).config
        try:
            # The path as the routes see it: without the app's route prefix (Serve's root_path).
            path = request.url.path.removeprefix(request.scope.get("root_path", ""))
            if path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
                # The routes' scope dependencies (serve/auth.py) read it.
                request.state.principal = principal_of(request, config)
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
                raise TooLarge(
                    f"body: {declared} bytes is over the limit of {config.max_body_bytes}"
                )
        except LoraplexError as e:
            await _error_response(e)(request.scope, receive, send)
            return
        await self.app(request.scope, receive, send)


app.add_middleware(Gate)


@app.exception_handler(RequestValidationError)
async def invalid_parameters(request: Request, error: RequestValidationError) -> JSONResponse:
    """A query or path parameter FastAPI could not convert (`?offset=abc`), in loraplex's error
    shape rather than FastAPI's `{"detail": [...]}`; the field without its `query.` prefix."""
    errors = [{**item, "loc": tuple(item["loc"])[1:] or item["loc"]} for item in error.errors()]
    return _error_response(InvalidRequest(describe_errors(errors)))


@app.exception_handler(HTTPException)
async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own refusals in loraplex's error shape rather than FastAPI's `{"detail":
    ...}`: no route for the path (404), or the path's routes take other methods (405)."""
    where = f"{request.method} {request.url.path}"
    headers = dict(error.headers or {})
    if error.status_code == 404:
        return _error_response(NotFound(f"{where}: no such route"))
    if error.status_code == 405:
        allowed = headers.get("Allow") or headers.get("allow") or "?"
        response = _error_response(MethodNotAllowed(f"{where}: not allowed; use {allowed}"))
        response.headers.update(headers)
        return response
    code = "invalid_request" if error.status_code < 500 else "internal"
    body = {"error": {"code": code, "message": f"{where}: {error.detail}"}}
    return JSONResponse(body, status_code=error.status_code, headers=headers)


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


@serve.deployment  # queue bounds: serve/app.py, from the config
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, handles: dict[str, DeploymentHandle]):
        check_serve_settings()  # here: Serve's settings are this process's, its handles' too
        # The routes find these through serve/routes/services.py's dependency.
        self.services = Services.build(AppConfig.model_validate(config), handles)
        # In the replica's event loop (Serve runs the constructor there), for its whole life:
        # a replica that starts picks up what a stopped one left in the queue.
        self.queue_worker = QueueWorker(self.services)
        self.queue_worker.start()
