"""Where replicas publish their hot adapters, so `/models` can show every replica, and where
the adapter routers of the ingress replicas agree on where a new adapter goes.

Ray Serve routes on each replica's multiplexed model ids but exposes no public API to read them,
so each replica reports its own state here (deployments/replica_reports.py, which finds this
actor by name): on every cache change, and from `check_health`, which Serve calls periodically
and so doubles as a heartbeat. Silent replicas age out, and those of a node that died are gone
at once. Each deployment's recently hot adapters outlive its replicas, so a replica that
starts (after a node was lost, or to scale up) loads them again (deployments/warm_start.py).
The actor runs on the head node, beside Serve's controller: it must outlive any other node.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

import ray

from deployments.replica_reports import NAMESPACE, registry_name

STALE_AFTER_S = 60.0
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
    def __init__(self) -> None:
        self._states = ReplicaStates()
        self._claims = PlacementClaims()
        self._recent = RecentAdapters()
        self._nodes_checked = -NODES_TTL_S

    def report(self, state: dict, report_number: int) -> None:
        self._states.report(state, report_number)
        self._recent.report(state)

    def recent_adapters(self, deployment: str) -> list[str]:
        """The adapters `deployment`'s replicas held most recently, the oldest first."""
        return self._recent.of(deployment)

    def remove(self, replica_id: str) -> None:
        self._states.remove(replica_id)

    def claim_placement(
        self, deployment: str, adapter_key: str, replica_id: str, candidate_ids: list[str]
    ) -> str:
        """PlacementClaims.claim, for the adapter routers of every ingress replica."""
        return self._claims.claim(deployment, adapter_key, replica_id, candidate_ids)

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        if now - self._nodes_checked >= NODES_TTL_S:
            self._nodes_checked = now
            self._states.remove_on_nodes(
                node["NodeID"] for node in ray.nodes() if not node["Alive"]
            )
        return self._states.snapshot()


def registry_for(app_name: str):
    """The app's registry actor, created by whichever process asks first, on the head node."""
    return ReplicaRegistry.options(
        name=registry_name(app_name),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        resources={HEAD_NODE_RESOURCE: 0.001},
    ).remote()
