"""The queue API: `POST /queue/<endpoint>` keeps a generation request and answers 202 at once;
its status, result and cancellation under `/queue/requests/{request_id}`.

Requests are written to the queue root before the 202 (serve/queue/store.py) and run by the
ingress replicas' queue workers (serve/queue/worker.py) through the synchronous call's code.
A tenant key sees only its own tenant's requests; another's are 404, as if they did not exist.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from deployments.errors import Conflict, InvalidRequest, NotFound, Overloaded
from deployments.outbound import check_url
from deployments.schemas import EditRequest, GenerationRequest, VideoRequest
from serve.auth import CanGenerate, Principal
from serve.openapi import ErrorDetail, json_body
from serve.queue.store import new_request_id
from serve.queue.worker import public_status
from serve.routes import generation
from serve.routes.bodies import read_json
from serve.routes.services import Services, ServicesDep

MAX_URL_CHARS = 2048
WEBHOOK_URL = Field(
    default=None,
    max_length=MAX_URL_CHARS,
    description="POSTed the status object, signed (X-Loraplex-Signature), when the request "
    "completes or fails.",
)


class QueuedGenerationRequest(GenerationRequest):
    webhook_url: str | None = WEBHOOK_URL


class QueuedVideoRequest(VideoRequest):
    webhook_url: str | None = WEBHOOK_URL


class QueuedEditRequest(EditRequest):
    webhook_url: str | None = WEBHOOK_URL


class Submitted(BaseModel):
    request_id: str
    status_url: str
    result_url: str
    cancel_url: str


class QueueStatus(BaseModel):
    request_id: str
    endpoint: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    submitted_at: float = Field(description="Unix time, seconds.")
    position: int | None = Field(
        default=None, description="Queued: how many requests of its deployment wait before it."
    )
    started_at: float | None = None
    finished_at: float | None = None
    seed: int | None = Field(default=None, description="Completed: the seed used (X-Seed).")
    error: ErrorDetail | None = Field(
        default=None, description="Failed: the error the synchronous call would have answered."
    )


QUEUE_BODY = json_body(QueuedGenerationRequest, QueuedVideoRequest, QueuedEditRequest)

router = APIRouter()


@router.post(
    "/queue/{endpoint}",
    status_code=202,
    response_model=Submitted,
    openapi_extra=QUEUE_BODY,
)
async def submit(
    endpoint: str, request: Request, services: ServicesDep, principal: CanGenerate
) -> Submitted:
    """Keep a generation request (the endpoint's body, plus `webhook_url`) and answer at once;
    503 when the deployment's queue holds `queue.max_queued` requests."""
    model, _ = generation.model_for(services, endpoint)
    body = await read_json(request, services.config.max_body_bytes)
    webhook_url = body.pop("webhook_url", None) if isinstance(body, dict) else None
    if webhook_url is not None:
        _check_webhook(webhook_url, services)
    model, job = await generation.resolve(services, endpoint, body, principal.tenant)
    kept = {
        "request_id": new_request_id(),
        "endpoint": endpoint,
        "deployment": model.name,
        "tenant": principal.tenant,
        # The seed drawn now: a request run again after a restart gives the same bytes.
        "body": {**body, "seed": job.seed},
        "webhook_url": webhook_url,
        "submitted_at": time.time(),
        "submitted_ns": time.time_ns(),
    }
    await asyncio.to_thread(_keep, services, kept)
    services.queue_submitted.set()
    request_id = kept["request_id"]
    status_url = str(request.url_for("queue_status", request_id=request_id))
    return Submitted(
        request_id=request_id,
        status_url=status_url,
        result_url=str(request.url_for("queue_result", request_id=request_id)),
        cancel_url=status_url,
    )


def _check_webhook(url: object, services: Services) -> None:
    queue = services.config.queue
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_CHARS:
        raise InvalidRequest(f"webhook_url: a URL of 1 to {MAX_URL_CHARS} characters")
    if queue.webhook_secret() is None:
        raise InvalidRequest(
            f"webhook_url: webhooks are off here (no signing secret in {queue.webhook_secret_env})"
        )
    check_url(url, queue.webhooks, "webhook_url")


def _keep(services: Services, kept: dict) -> None:
    limit = services.config.queue.max_queued
    if len(services.queue.pending(kept["deployment"])) >= limit:
        raise Overloaded(
            f"{kept['deployment']}: the queue holds {limit} requests (queue.max_queued); "
            "retry shortly"
        )
    services.queue.submit(kept)


@router.get(
    "/queue/requests/{request_id}",
    name="queue_status",
    response_model=QueueStatus,
    response_model_exclude_none=True,
)
async def status(request_id: str, services: ServicesDep, principal: CanGenerate) -> dict:
    """queued (with its position), running, completed, failed (with the error object) or
    cancelled."""
    return await asyncio.to_thread(_status, services, request_id, principal)


def _seen(services: Services, request_id: str, principal: Principal) -> tuple[dict, dict]:
    kept = services.queue.request(request_id)
    if principal.tenant is not None and kept["tenant"] != principal.tenant:
        raise NotFound(f"request_id: no queued request {request_id}")
    return kept, services.queue.status(request_id)


def _status(services: Services, request_id: str, principal: Principal) -> dict:
    kept, state = _seen(services, request_id, principal)
    shown = public_status(kept, state)
    if state["status"] == "queued":
        shown["position"] = _position(services, kept)
    return shown


def _position(services: Services, kept: dict) -> int:
    """Requests of its deployment submitted before it and not yet running."""
    ahead = 0
    for _marker, other in services.queue.pending(kept["deployment"]):
        if other == kept["request_id"]:
            return ahead
        try:
            ahead += services.queue.status(other)["status"] == "queued"
        except NotFound:
            continue
    return ahead


@router.get(
    "/queue/requests/{request_id}/result",
    name="queue_result",
    response_class=Response,
    responses=generation.GENERATED,
)
async def result(request_id: str, services: ServicesDep, principal: CanGenerate) -> Response:
    """A completed request's media, with the synchronous response's headers; 409 before."""
    kept, state = await asyncio.to_thread(_seen, services, request_id, principal)
    if state["status"] != "completed":
        raise Conflict(f"request_id: {request_id} is {state['status']}, not completed")
    content = await asyncio.to_thread(services.queue.result, request_id)
    return Response(content, media_type=state["media_type"], headers=state["headers"])


@router.delete(
    "/queue/requests/{request_id}", response_model=QueueStatus, response_model_exclude_none=True
)
async def cancel(request_id: str, services: ServicesDep, principal: CanGenerate) -> dict:
    """Cancel a queued or running request (a running render is interrupted); 409 once it
    has finished."""
    return await asyncio.to_thread(_cancel, services, request_id, principal)


def _cancel(services: Services, request_id: str, principal: Principal) -> dict:
    kept, state = _seen(services, request_id, principal)
    if state["status"] not in ("queued", "running"):
        raise Conflict(f"request_id: {request_id} is {state['status']}; nothing to cancel")
    state = {**state, "status": "cancelled", "finished_at": time.time()}
    services.queue.set_status(request_id, state)
    if state.get("started_at") is None:
        services.queue.finish(kept)  # a running one's worker stops it and finishes it
    return public_status(kept, state)
