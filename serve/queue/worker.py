"""Each ingress replica's queue worker: claims queued requests, runs them, keeps their outcome.

It runs in the ingress replica's event loop, started with the replica, so a replica that
starts after another stopped picks up what that one left: queued requests, and running ones
whose lease lapsed. A request runs through the same code as the synchronous call
(serve/routes/generation.py's `resolve` and `render`), so its bytes, headers and errors are
the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from ray import serve

from deployments.errors import LoraplexError, NotFound
from serve.queue.store import TERMINAL, QueueStore
from serve.queue.webhooks import deliver
from serve.routes import generation
from serve.routes.services import REPLICA_LOST, Services, replica_error

# How often finished requests past their retention are looked for.
SWEEP_EVERY_S = 60.0

logger = logging.getLogger("ray.serve")


def error_object(error: BaseException) -> dict:
    """The `{"code", "message"}` the synchronous call would have answered with."""
    cause = replica_error(error)
    if isinstance(cause, LoraplexError):
        return {"code": cause.code, "message": cause.message}
    if isinstance(error, REPLICA_LOST):
        return {
            "code": "replica_unavailable",
            "message": f"the replica serving it is gone ({type(error).__name__}); retry shortly",
        }
    return {"code": "internal", "message": "internal error; see the server log"}


def public_status(request: dict, status: dict) -> dict:
    """A request's status as GET /queue/requests/{id} and webhooks show it."""
    shown = {
        "request_id": request["request_id"],
        "endpoint": request["endpoint"],
        "submitted_at": request["submitted_at"],
    }
    for field in ("status", "started_at", "finished_at", "error", "seed"):
        if status.get(field) is not None:
            shown[field] = status[field]
    return shown


class QueueWorker:
    def __init__(self, services: Services):
        self.services = services
        self.store: QueueStore = services.queue
        self.config = services.config.queue
        replica = serve.get_replica_context().replica_id.unique_id
        self.owner = f"{replica}-{uuid.uuid4().hex[:8]}"
        self._running: dict[str, str] = {}  # request id -> deployment
        self._tasks: set[asyncio.Task] = set()  # runs and webhook deliveries, kept referenced
        self._next_sweep = 0.0

    def start(self) -> None:
        self._spawn(self._work())

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _work(self) -> None:
        submitted = self.services.queue_submitted
        while True:
            try:
                await self._poll()
            except Exception:  # noqa: BLE001 - a store failure must not end the worker
                logger.exception("queue worker: poll failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(submitted.wait(), self.config.poll_s)
            submitted.clear()

    async def _poll(self) -> None:
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_EVERY_S
            await asyncio.to_thread(self.store.remove_expired, self.config.result_retention_s)
        for model in self.services.config.models:
            await self._claim_from(model.name)

    async def _claim_from(self, deployment: str) -> None:
        running = sum(1 for d in self._running.values() if d == deployment)
        if running >= self.config.max_running:
            return
        for marker, request_id in await asyncio.to_thread(self.store.pending, deployment):
            if request_id in self._running:
                continue
            claimed = await asyncio.to_thread(self._claim, marker, request_id)
            if claimed is None:
                continue
            self._running[request_id] = deployment
            self._spawn(self._run(*claimed))
            running += 1
            if running >= self.config.max_running:
                return

    def _claim(self, marker: str, request_id: str) -> tuple[dict, dict] | None:
        """(request, status) once this replica holds the request; None when it is another's
        or already finished (its marker is then removed). The small files first: a request
        body (an edit's image) is read only once claimed."""
        try:
            status = self.store.status(request_id)
            if status["status"] in TERMINAL:
                self.store.drop_marker(marker)
                return None
            if not self.store.claim(request_id, self.owner, self.config.lease_s):
                return None
            # Read again once claimed: a DELETE may have cancelled it meanwhile.
            status = self.store.status(request_id)
            if status["status"] in TERMINAL:
                self.store.drop_marker(marker)
                return None
            return self.store.request(request_id), status
        except NotFound:  # removed by retention, or a submit that failed half-way
            self.store.drop_marker(marker)
            return None

    async def _run(self, request: dict, status: dict) -> None:
        request_id = request["request_id"]
        try:
            status = {**status, "status": "running", "started_at": time.time()}
            await asyncio.to_thread(self.store.set_status, request_id, status)
            render = asyncio.ensure_future(self._render(request))
            if not await self._watch(request_id, render):
                return
            await self._keep_outcome(request, status, render)
        except Exception:  # noqa: BLE001 - the lease lapses and the request runs again
            logger.exception("queue worker: %s failed outside its render", request_id)
        finally:
            self._running.pop(request_id, None)

    async def _render(self, request: dict) -> generation.Rendered:
        model, job = await generation.resolve(
            self.services, request["endpoint"], request["body"], request["tenant"]
        )
        return await generation.render(self.services, model, job)

    async def _watch(self, request_id: str, render: asyncio.Future) -> bool:
        """Wait for the render, renewing the lease; False (the render cancelled) when the
        request was cancelled or another replica holds it now."""
        renewed = time.monotonic()
        while not render.done():
            await asyncio.wait({render}, timeout=self.config.poll_s)
            if render.done():
                break
            status = await asyncio.to_thread(self.store.status, request_id)
            keep = status["status"] == "running"
            if keep and time.monotonic() - renewed > self.config.lease_s / 3:
                keep = await asyncio.to_thread(
                    self.store.renew, request_id, self.owner, self.config.lease_s
                )
                renewed = time.monotonic()
            if not keep:
                render.cancel()
                with contextlib.suppress(BaseException):
                    await render
                if status["status"] == "cancelled":
                    await asyncio.to_thread(self._finish_cancelled, request_id)
                return False
        return True

    def _finish_cancelled(self, request_id: str) -> None:
        self.store.finish(self.store.request(request_id))

    async def _keep_outcome(self, request: dict, status: dict, render: asyncio.Future) -> None:
        request_id = request["request_id"]
        error = render.exception()
        if error is None:
            rendered = render.result()
            await asyncio.to_thread(self.store.write_result, request_id, rendered.content)
            outcome = {
                "status": "completed",
                "media_type": rendered.media_type,
                "headers": rendered.headers,
                "seed": int(rendered.headers["X-Seed"]),
            }
        else:
            if not isinstance(replica_error(error), LoraplexError):
                logger.error("queue: %s failed", request_id, exc_info=error)
            outcome = {"status": "failed", "error": error_object(error)}
        status = {**status, **outcome, "finished_at": time.time()}

        def keep() -> bool:
            if self.store.status(request_id)["status"] == "cancelled":  # while it finished
                self.store.finish(request)
                return False
            self.store.set_status(request_id, status)
            self.store.finish(request)
            return True

        if await asyncio.to_thread(keep) and request.get("webhook_url"):
            self._spawn(self._notify(request, status))

    async def _notify(self, request: dict, status: dict) -> None:
        secret = self.config.webhook_secret()
        if secret is None:  # checked at submit; the variable went since
            logger.warning("queue: %s: no webhook secret now; not sent", request["request_id"])
            return
        await deliver(
            request["webhook_url"],
            public_status(request, status),
            secret,
            self.config.webhooks,
            self.config.webhook_retry_s,
            self.config.webhook_timeout_s,
        )
