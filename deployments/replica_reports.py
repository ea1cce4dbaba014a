"""How a model replica tells the app's registry (serve/registry.py) what it holds.

The registry is an actor of the app; this layer never imports it. The app builder hands each
replica the function that creates or finds it (`serve.registry.registry_for`); a replica built
without one looks it up by name, and while it is not there looks again every `RETRY_S`, then
reports its state as it is then.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import ray

NAMESPACE = "loraplex"
RETRY_S = 0.5


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
        if find_or_create is not None:
            # Now, not at the first report: the actor is then alive by the time that report is
            # sent, so it arrives before a request the ingress sends once the app is up.
            self._registry()

    def report(self) -> None:
        """Send the replica's state now; without a registry, again in `RETRY_S`."""
        with self._lock:
            self._made += 1
            registry = self._registry()
            if registry is not None:
                registry.report.remote(self._describe(), self._made)
            elif not self._retry_pending:
                self._retry_pending = True
                retry = threading.Timer(RETRY_S, self._report_again)
                retry.daemon = True
                retry.start()

    def _report_again(self) -> None:
        with self._lock:
            self._retry_pending = False
        self.report()

    async def recent_adapters(self, deployment: str, timeout_s: float) -> list[str]:
        """The adapters `deployment`'s replicas held most recently (the registry keeps them
        after those replicas are gone), the oldest first; none without a registry."""
        registry = self._registry()
        if registry is None:
            return []
        return await asyncio.wait_for(registry.recent_adapters.remote(deployment), timeout_s)

    def remove(self, replica_id: str) -> None:
        registry = self._registry()
        if registry is not None:
            registry.remove.remote(replica_id)

    def _registry(self):
        if self._handle is None and self._find_or_create is not None:
            self._handle = self._find_or_create(self._app_name)
        if self._handle is None:
            try:
                self._handle = ray.get_actor(self._name, namespace=NAMESPACE)
            except ValueError:  # not created yet, or gone: Ray's answer for an unknown name
                return None
        return self._handle
