"""Where replicas publish their hot adapters, so `/models` can show every replica.

Ray Serve routes on each replica's multiplexed model ids but exposes no public API to read them,
so each replica reports its own state here: on every cache change, and from `check_health`,
which Serve calls periodically and so doubles as a heartbeat. Silent replicas age out.
"""

from __future__ import annotations

import time

import ray

NAMESPACE = "loraplex"
STALE_AFTER_S = 60.0


@ray.remote(num_cpus=0)
class ReplicaRegistry:
    def __init__(self) -> None:
        self._states: dict[str, tuple[float, dict]] = {}

    def report(self, state: dict) -> None:
        self._states[state["replica_id"]] = (time.monotonic(), state)

    def remove(self, replica_id: str) -> None:
        self._states.pop(replica_id, None)

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        self._states = {k: v for k, v in self._states.items() if now - v[0] < STALE_AFTER_S}
        return [state for _, state in self._states.values()]


def registry_for(app_name: str):
    """The app's registry actor, created by whichever process asks first."""
    return ReplicaRegistry.options(
        name=f"replicas-{app_name}",
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
    ).remote()
