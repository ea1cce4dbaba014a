"""Where replicas publish their hot adapters, so `/models` can show every replica, and where
the adapter routers of the ingress replicas agree on where a new adapter goes.

Ray Serve routes on each replica's multiplexed model ids but exposes no public API to read them,
so each replica reports its own state here (deployments/replica_reports.py): on every cache
change, and as a heartbeat every second. A replica not heard from for `STALE_AFTER_S` is gone
(killed replicas never say goodbye), and those of a node that died are gone at once. Each
deployment's recently hot adapters outlive its replicas, so a replica that starts (after a node
was lost, or to scale up) loads them again (deployments/warm_start.py).

The actor is detached and restarted by Ray when its process dies, under the same name and for
the same handles; it keeps nothing across a restart, and the replicas' next heartbeats fill it
again. It ends itself once its app is gone. It runs on the head node, beside Serve's controller:
it must outlive any other node.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable

import ray
from ray.exceptions import RayActorError

from deployments.errors import ReplicaUnavailable
from deployments.replica_reports import HEARTBEAT_S, NAMESPACE, registry_name

# A few missed heartbeats: a replica busy rendering still beats (its event loop is free).
STALE_AFTER_S = 5 * HEARTBEAT_S
# A restarted registry knows no replica until each has reported again: its first answers wait
# this long after its restart, a heartbeat and one more for a report held up by the restart.
# (Not a new one: a replica's warm start would then wait for the adapters that the other
# replicas load as the app starts, and load them a second time.)
FILL_S = 2 * HEARTBEAT_S
# Whether the app still exists is asked of Serve this often; gone this many times in a row
# (deleted, or Serve shut down), the registry ends itself.
APP_CHECK_S = 10.0
APP_GONE_CHECKS = 3
# How long the ingress waits for the registry (a restart included) before answering 503.
CALL_TIMEOUT_S = 10.0
# A claim only has to outlive one first load and its report to every router (as the routers'
# own placements, serve/adapter_router.py).
CLAIM_TTL_S = 120.0
MAX_CLAIMS = 4096
# How long the registry trusts its view of which nodes are alive (one GCS call per refresh).
NODES_TTL_S = 1.0
# Ray's resource that only the head node has; Serve's controller asks for a sliver of it too.
HEAD_NODE_RESOURCE = "node:__internal_head__"


def drop_stale(entries: OrderedDict, now: float, ttl_s: float, max_entries: int) -> None:
    """Drop the oldest entries of `entries` (values `(..., monotonic time added)`, oldest
    first) that are `ttl_s` old, and more while one more would exceed `max_entries`."""
    while entries and (
        len(entries) >= max_entries or now - next(iter(entries.values()))[1] >= ttl_s
    ):
        entries.popitem(last=False)


class PlacementClaims:
    """Placements of new adapters shared by the routers of every ingress replica (held by the
    app's registry actor, serve/registry.py): the first claim for an adapter of a deployment
    wins while it is fresh and its replica is still among the caller's candidates."""

    def __init__(self, ttl_s: float = CLAIM_TTL_S, max_claims: int = MAX_CLAIMS):
        self._ttl_s = ttl_s
        self._max_claims = max_claims
        # (deployment, adapter key) -> (replica unique id, monotonic time claimed), oldest first
        self._claims: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def claim(
        self, deployment: str, adapter_key: str, replica_id: str, candidate_ids: list[str]
    ) -> str:
        """The replica the adapter goes to: an earlier claim's, else `replica_id`."""
        now = time.monotonic()
        key = (deployment, adapter_key)
        held = self._claims.get(key)
        if held is not None and now - held[1] < self._ttl_s and held[0] in candidate_ids:
            return held[0]
        self._claims.pop(key, None)
        drop_stale(self._claims, now, self._ttl_s, self._max_claims)
        self._claims[key] = (replica_id, now)
        return replica_id


class ReplicaStates:
    """Each replica's latest reported state. A replica reports from its event loop and from
    Serve's health-check thread, so two reports can arrive in the other order than they were
    made: each carries the replica's report number, and an older one never replaces a newer.
    For the same reason a report can arrive after its replica was removed: a removed replica
    stays removed."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S):
        self._stale_after_s = stale_after_s
        # replica id -> (monotonic time received, report number, state)
        self._states: dict[str, tuple[float, int, dict]] = {}
        # replica id -> monotonic time removed, kept as long as a silent replica's state would
        # be (Serve never reuses a replica id; reports in flight arrive well within that).
        self._removed: dict[str, float] = {}

    def report(self, state: dict, report_number: int) -> None:
        replica_id = state["replica_id"]
        held = self._states.get(replica_id)
        if replica_id in self._removed or (held is not None and held[1] > report_number):
            return
        self._states[replica_id] = (time.monotonic(), report_number, state)

    def remove(self, replica_id: str) -> None:
        self._states.pop(replica_id, None)
        now = time.monotonic()
        self._removed = {k: t for k, t in self._removed.items() if now - t < self._stale_after_s}
        self._removed[replica_id] = now

    def remove_on_nodes(self, node_ids: Iterable[str]) -> None:
        """Remove the replicas that reported from these nodes (nodes that died: their replicas
        never said goodbye)."""
        dead = set(node_ids)
        for replica_id, (_, _, state) in list(self._states.items()):
            if state.get("node_id") in dead:
                self.remove(replica_id)

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        self._states = {k: v for k, v in self._states.items() if now - v[0] < self._stale_after_s}
        return [state for _, _, state in self._states.values()]


class RecentAdapters:
    """Per deployment, the adapters its replicas reported hot, most recent last, at most the
    deployment's `max_adapters_per_replica`. A replica's death does not remove its adapters:
    this is what a replica that replaces it loads."""

    def __init__(self) -> None:
        self._recent: dict[str, OrderedDict[str, None]] = {}

    def report(self, state: dict) -> None:
        recent = self._recent.setdefault(state["deployment"], OrderedDict())
        for name in state.get("hot_adapters", []):  # in load order: the newest last
            recent[name] = None
            recent.move_to_end(name)
        limit = state.get("max_adapters_per_replica") or len(recent)
        while len(recent) > limit:
            recent.popitem(last=False)

    def of(self, deployment: str) -> list[str]:
        return list(self._recent.get(deployment, ()))


@ray.remote(num_cpus=0)
class ReplicaRegistry:
    """An async actor: its state is touched on its event loop only, and a restarted registry's
    first answers can wait for the heartbeats without holding up the reports."""

    def __init__(self, app_name: str, app_check_s: float = APP_CHECK_S) -> None:
        self._app_name = app_name
        self._app_check_s = app_check_s
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self._filled_at = time.monotonic() + (FILL_S if restarted else 0.0)
        self._states = ReplicaStates()
        self._claims = PlacementClaims()
        self._recent = RecentAdapters()
        self._nodes_checked = -NODES_TTL_S
        self._app_watch: asyncio.Task | None = None

    async def report(self, state: dict, report_number: int) -> None:
        self._watch_app()
        self._states.report(state, report_number)
        self._recent.report(state)

    async def recent_adapters(self, deployment: str) -> list[str]:
        """The adapters `deployment`'s replicas held most recently, the oldest first."""
        self._watch_app()
        await self._filled()
        return self._recent.of(deployment)

    async def remove(self, replica_id: str) -> None:
        self._states.remove(replica_id)

    async def claim_placement(
        self, deployment: str, adapter_key: str, replica_id: str, candidate_ids: list[str]
    ) -> str:
        """PlacementClaims.claim, for the adapter routers of every ingress replica."""
        self._watch_app()
        return self._claims.claim(deployment, adapter_key, replica_id, candidate_ids)

    async def snapshot(self) -> list[dict]:
        self._watch_app()
        await self._filled()
        now = time.monotonic()
        if now - self._nodes_checked >= NODES_TTL_S:
            self._nodes_checked = now
            nodes = await asyncio.to_thread(ray.nodes)
            self._states.remove_on_nodes(node["NodeID"] for node in nodes if not node["Alive"])
        return self._states.snapshot()

    async def _filled(self) -> None:
        await asyncio.sleep(max(0.0, self._filled_at - time.monotonic()))

    def _watch_app(self) -> None:
        # Started by the first call, not in __init__: an async actor's loop runs its methods.
        if self._app_watch is None:
            self._app_watch = asyncio.get_running_loop().create_task(self._end_with_app())

    async def _end_with_app(self) -> None:
        """End this actor once its app is gone: it is detached, so nothing else would. A
        registry ended while its app still runs (Serve unreachable for long) is created again
        by the next call that does not find it."""
        gone = 0
        while gone < APP_GONE_CHECKS:
            await asyncio.sleep(self._app_check_s)
            gone = 0 if await asyncio.to_thread(_app_running, self._app_name) else gone + 1
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def _app_running(app_name: str) -> bool:
    from ray import serve  # here: the registry's process needs Serve for this call only

    try:
        return app_name in serve.status().applications
    except Exception:  # noqa: BLE001 - Serve's controller gone (serve.shutdown) or unreachable
        return False


def registry_for(app_name: str):
    """The app's registry actor, created by whichever process asks first, on the head node.
    Restarted by Ray whenever its process dies; calls made meanwhile wait for the restart."""
    return ReplicaRegistry.options(
        name=registry_name(app_name),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=-1,
        resources={HEAD_NODE_RESOURCE: 0.001},
    ).remote(app_name)


class RegistryClient:
    """The ingress's calls to the registry: bounded in time, and a registry gone for good (not
    restarting: Ray holds calls until a restart is done) is found again by name."""

    def __init__(self, app_name: str, timeout_s: float = CALL_TIMEOUT_S):
        self._app_name = app_name
        self._timeout_s = timeout_s
        self._handle = registry_for(app_name)

    async def snapshot(self) -> list[dict]:
        """Every live replica's latest report; ReplicaUnavailable without an answer."""
        for _ in range(2):
            if self._handle is None:
                self._handle = registry_for(self._app_name)
            try:
                return await asyncio.wait_for(self._handle.snapshot.remote(), self._timeout_s)
            except RayActorError as e:
                self._handle, lost = None, e
            except asyncio.TimeoutError as e:
                raise ReplicaUnavailable(
                    f"the replica registry did not answer within {self._timeout_s:.0f} s; "
                    "retry shortly"
                ) from e
        raise ReplicaUnavailable(
            f"the replica registry is gone ({type(lost).__name__}); retry shortly"
        ) from lost
