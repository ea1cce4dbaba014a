"""How a model replica tells the app's registry (serve/registry.py) what it holds.

The registry is an actor of the app, found by its name; this layer never imports it. The
ingress creates it at start; a replica that starts first, or finds it gone, skips that report
and looks again at its next one (every cache change, and every health check).
"""

from __future__ import annotations

import threading

import ray

NAMESPACE = "loraplex"


def registry_name(app_name: str) -> str:
    """The registry actor's name for a Serve application."""
    return f"replicas-{app_name}"


class RegistryReports:
    def __init__(self, app_name: str):
        self._name = registry_name(app_name)
        self._handle = None
        # Reports come from the event loop and from Serve's health-check thread: numbered under
        # a lock, so the registry keeps the newest whichever order they arrive in.
        self._lock = threading.Lock()
        self._made = 0

    def report(self, state: dict) -> bool:
        """Send `state`; False when no registry was found (the next report looks again)."""
        with self._lock:
            self._made += 1
            registry = self._registry()
            if registry is None:
                return False
            registry.report.remote(state, self._made)
            return True

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
