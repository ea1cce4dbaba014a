"""How a model replica tells the app's registry (serve/registry.py) what it holds.

The registry is an actor of the app, found by its name; this layer never imports it. The
ingress creates it at start; a replica that starts first, or finds it gone, looks again every
`RETRY_S` until it is there, then reports its state as it is then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import ray

NAMESPACE = "loraplex"
RETRY_S = 0.5


def registry_name(app_name: str) -> str:
    """The registry actor's name for a Serve application."""
    return f"replicas-{app_name}"


class RegistryReports:
    def __init__(self, app_name: str, describe: Callable[[], dict]):
        self._name = registry_name(app_name)
        self._describe = describe
        self._handle = None
        # Reports come from the event loop and from Serve's health-check thread: numbered under
        # a lock, so the registry keeps the newest whichever order they arrive in.
        self._lock = threading.Lock()
        self._made = 0
        self._retry_pending = False

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

    def remove(self, replica_id: str) -> None:
        registry = self._registry()
        if registry is not None:
            registry.remove.remote(replica_id)

    def _registry(self):
        if self._handle is None:
            try:
                self._handle = ray.get_actor(self._name, namespace=NAMESPACE)
            except ValueError:  # not created yet, or gone: Ray's answer for an unknown name
                return None
        return self._handle
