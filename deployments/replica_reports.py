"""How a model replica tells the app's registry (serve/registry.py) what it holds.

The registry is an actor of the app; this layer never imports it. The app builder hands each
replica the function that creates or finds it (`serve.registry.registry_for`); a replica built
without one looks it up by name, and while it is not there looks again every `RETRY_S`.

A replica reports on every change of its state and, as a heartbeat, every `HEARTBEAT_S`: a
replica killed outright never says goodbye, so the registry drops one it has not heard from for
a few heartbeats, and a registry that was restarted (it keeps nothing) has every live replica
back within one. A heartbeat whose call finds the registry gone for good forgets it, and the
next report finds or creates it again by name.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

logger = logging.getLogger("ray.serve")

NAMESPACE = "loraplex"
RETRY_S = 0.5
HEARTBEAT_S = 1.0
# A heartbeat's reply is awaited this long, to learn whether the registry is gone for good; a
# restarting one holds it (Ray resends calls to a restarted actor).
HEARTBEAT_REPLY_S = 10.0


def registry_name(app_name: str) -> str:
    """The registry actor's name for a Serve application."""
    return f"replicas-{app_name}"


class RegistryReports:
    def __init__(
        self,
        app_name: str,
        describe: Callable[[], dict],
        find_or_create: Callable[[str], Any] | None = None,
    ):
        self._app_name = app_name
        self._find_or_create = find_or_create
        self._name = registry_name(app_name)
        self._describe = describe
        self._handle = None
        # Reports come from the event loop and from Serve's health-check thread: numbered under
        # a lock, so the registry keeps the newest whichever order they arrive in.
        self._lock = threading.Lock()
        self._made = 0
        self._retry_pending = False
        self._stopped = False
        self._replies: set[asyncio.Task] = set()
        if find_or_create is not None:
            # Now, not at the first report: the actor is then alive by the time that report is
            # sent, so it arrives before a request the ingress sends once the app is up.
            self._registry()
        self._heartbeat = _start_on_running_loop(self._beat())

    def report(self):
        """Send the replica's state now; without a registry, again in `RETRY_S`. The call's
        ObjectRef, or None."""
        with self._lock:
            self._made += 1
            registry = self._registry()
            if registry is not None:
                return registry.report.remote(self._describe(), self._made)
            if not self._retry_pending:
                self._retry_pending = True
                retry = threading.Timer(RETRY_S, self._report_again)
                retry.daemon = True
                retry.start()
            return None

    def _report_again(self) -> None:
        with self._lock:
            self._retry_pending = False
        self.report()

    async def _beat(self) -> None:
        """A report every HEARTBEAT_S until `remove`; on the replica's event loop, as the
        reports of its cache changes, so `describe` never runs beside them. Each reply is
        awaited beside the next beats, so a slow registry does not slow them."""
        while not self._stopped:
            await asyncio.sleep(HEARTBEAT_S)
            if self._stopped:
                return
            try:
                reply = self.report()
            except Exception as e:  # noqa: BLE001 - the next beat tries again
                logger.warning("registry heartbeat of %s: %r", self._app_name, e)
                continue
            if reply is not None:
                # Held until done: the loop keeps only weak references to its tasks.
                task = asyncio.get_running_loop().create_task(self._check_reply(reply))
                self._replies.add(task)
                task.add_done_callback(self._replies.discard)

    async def _check_reply(self, reply) -> None:
        try:
            await asyncio.wait_for(reply, HEARTBEAT_REPLY_S)
        except RayActorError:  # gone for good (Ray holds calls over a restart): look again
            self._forget()
        except Exception as e:  # noqa: BLE001 - a slow registry: the next beats go on
            logger.debug("registry heartbeat of %s: %r", self._app_name, e)

    async def recent_adapters(self, deployment: str, timeout_s: float) -> list[str]:
        """The adapters `deployment`'s replicas held most recently (the registry keeps them
        after those replicas are gone), the oldest first; none without a registry. A registry
        gone for good is looked for once more."""
        for attempt in range(2):
            with self._lock:
                registry = self._registry()
            if registry is None:
                return []
            try:
                call = registry.recent_adapters.remote(deployment)
                return await asyncio.wait_for(call, timeout_s)
            except RayActorError:
                self._forget()
                if attempt == 1:
                    raise
        return []

    def remove(self, replica_id: str) -> None:
        """Say goodbye: the replica leaves the registry now, and its heartbeats stop."""
        self._stopped = True
        with self._lock:
            registry = self._registry()
        if registry is not None:
            registry.remove.remote(replica_id)

    def _forget(self) -> None:
        with self._lock:
            self._handle = None

    def _registry(self):
        if self._handle is None and self._find_or_create is not None:
            self._handle = self._find_or_create(self._app_name)
        if self._handle is None:
            try:
                self._handle = ray.get_actor(self._name, namespace=NAMESPACE)
            except ValueError:  # not created yet, or gone: Ray's answer for an unknown name
                return None
        return self._handle


def _start_on_running_loop(coroutine) -> asyncio.Task | None:
    """`coroutine` as a task on the running event loop (Serve runs a replica's constructor on
    it); closed unstarted outside one (a script, a unit test)."""
    try:
        return asyncio.get_running_loop().create_task(coroutine)
    except RuntimeError:
        coroutine.close()
        return None
