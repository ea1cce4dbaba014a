"""`POST /{endpoint}`: generate with an endpoint's model; `<endpoint>-lora` requires a LoRA.

Included last: `/{endpoint}` would match every other POST route of the ingress.
"""

import asyncio
import logging
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response
from ray import serve
from ray.serve.exceptions import BackPressureError

from deployments.config import ModelConfig
from deployments.errors import NotFound, Overloaded, ReplicaUnavailable
from deployments.schemas import GenerationJob
from serve.auth import CanGenerate
from serve.openapi import ENDPOINT_BODY
from serve.resolve import resolve_job
from serve.routes.bodies import read_json
from serve.routes.services import REPLICA_LOST, Services, ServicesDep

# The body is read by hand (its model depends on the endpoint's family: video endpoints add
# length and fps, edit endpoints the image): the description gives each endpoint its own.
GENERATION_BODY = ENDPOINT_BODY
MEDIA = {"schema": {"type": "string", "format": "binary"}}
GENERATED = {
    200: {
        "description": "The generated media, with X-Seed, X-Model and cost headers.",
        "content": {media: MEDIA for media in ("image/png", "image/jpeg", "image/webp")},
    }
}

# How long a generation whose replica died waits for a running replica of its deployment before
# it answers 503: Serve starts a replacement at once, but one that cannot be placed (no node
# has room) would leave a retry queued in the handle for as long as the client waits.
REPLICA_WAIT_S = 30.0
REPLICA_POLL_S = 0.5

logger = logging.getLogger("ray.serve")

router = APIRouter()


@router.post(
    "/{endpoint}", openapi_extra=GENERATION_BODY, response_class=Response, responses=GENERATED
)
async def generate(
    endpoint: str, request: Request, services: ServicesDep, principal: CanGenerate
) -> Response:
    """Generate with the endpoint's model. `<model>-lora` endpoints require a LoRA; a tenant
    key's LoRA names are its own or shared ones."""
    model_for(services, endpoint)  # an unknown endpoint is 404 before its body is read
    body = await read_json(request, services.config.max_body_bytes)
    model, job = await resolve(services, endpoint, body, principal.tenant)
    rendered = await render(services, model, job)
    return Response(rendered.content, media_type=rendered.media_type, headers=rendered.headers)


@dataclass(frozen=True)
class Rendered:
    """A generation's answer: the media and the headers the synchronous response carries."""

    content: bytes
    media_type: str
    headers: dict[str, str]


async def resolve(
    services: Services, endpoint: str, body: object, tenant: str | None
) -> tuple[ModelConfig, GenerationJob]:
    """The endpoint's model and the job for `body`; the typed refusals of serve/resolve.py.
    The queue (serve/queue/) calls it at submit and again when the request runs."""
    model, lora_required = model_for(services, endpoint)
    # Off the event loop: resolving names reads the LoRA root (on an object store, a request
    # per file; "auto" trigger words read file headers), which would hold up every other
    # request this ingress replica is serving meanwhile.
    job = await asyncio.to_thread(
        resolve_job,
        body,
        model,
        lora_required=lora_required,
        store=services.store,
        config=services.config,
        tenant=tenant,
    )
    return model, job


def model_for(services: Services, endpoint: str) -> tuple[ModelConfig, bool]:
    """(model, lora_required) for an endpoint name; NotFound for another name."""
    found = services.config.model_for_endpoint(endpoint)
    if found is None:
        raise NotFound(f"no endpoint /{endpoint}")
    return found


async def render(services: Services, model: ModelConfig, job: GenerationJob) -> Rendered:
    """The job rendered by one of the model's replicas, with the response headers."""
    handle = services.handles[model.name]
    if job.adapters:
        handle = handle.options(multiplexed_model_id=job.adapters[0].key)
    result = await _generate_retrying(handle, job, model.name)
    headers = {
        "X-Seed": str(job.seed),
        "X-Model": model.name,
        "X-Inference-Ms": f"{result.inference_ms:.1f}",
        "X-GPU-Seconds": f"{result.gpu_seconds:.4f}",
        "X-Cost-USD": f"{result.cost_usd:.6f}",
    }
    if result.lora_cache:
        headers["X-LoRA-Cache"] = ",".join(result.lora_cache)
    return Rendered(result.content, result.media_type, headers)


async def _generate_retrying(handle, job, deployment: str):
    """The job's result; a job whose replica was lost is sent once more, where Serve routes it
    now (a generation is idempotent: the job carries its seed and its adapters' versions)."""
    try:
        return await _generate(handle, job, deployment)
    except REPLICA_LOST as e:
        lost = e
    logger.warning(
        "%s: the replica serving a request is gone (%r); sending it once more", deployment, lost
    )
    if not await _replica_running(deployment, REPLICA_WAIT_S):
        raise ReplicaUnavailable(
            f"{deployment}: the replica serving the request is gone ({type(lost).__name__}) "
            f"and none is running after {REPLICA_WAIT_S:.0f} s; retry shortly"
        ) from lost
    return await _generate(handle, job, deployment)


async def _generate(handle, job, deployment: str):
    response = handle.generate.remote(job)
    try:
        return await response
    except asyncio.CancelledError:
        # A queued request cancelled while it runs (DELETE /queue/requests/{id}): the replica
        # interrupts the render as it does for a client that went away.
        response.cancel()
        raise
    except BackPressureError as e:
        raise Overloaded(f"{deployment} is at capacity; retry shortly") from e


async def _replica_running(deployment: str, wait_s: float) -> bool:
    """Whether Serve has a running replica of `deployment` of this app, within `wait_s`."""
    app_name = serve.get_replica_context().app_name
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        status = await asyncio.to_thread(serve.status)  # a call to Serve's controller
        app = status.applications.get(app_name)
        found = app.deployments.get(deployment) if app is not None else None
        if found is not None and found.replica_states.get("RUNNING", 0) > 0:
            return True
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(REPLICA_POLL_S)
