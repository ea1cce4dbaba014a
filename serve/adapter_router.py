"""AdapterAffinityRouter: Serve's request router for the model deployments.

Serve's default router sends a request for an adapter to a replica that reports holding it,
and a request for an adapter no replica reports to a replica with the fewest adapters. A
replica reports an adapter once its load starts (Serve's multiplexer counts loads under way,
ray/serve/multiplex.py `_get_loading_and_loaded_model_ids`), but a loraplex replica starts a
load only when the request reaches the front of its queue (loads and generations share one
lock), and the report then reaches the routers through Serve's controller. Until then a second
request for the adapter finds no holder, falls back to the fewest-adapters replicas, and may
load the same adapter on another replica: a burst of requests for a new adapter loads it on
several replicas, each load evicting something hot there.

This router keeps Serve's order of preference (holders first) and closes that window: the
first request for an adapter no replica holds places it on one replica, chosen by the fewest
adapters (held, or placed there and not yet reported) with ties broken by rendezvous hashing of
the adapter's key, and the router sends every later request for it there until a replica
reports it. Each ingress replica has a router of its own, and their counts of adapters placed
and not yet reported differ, so two of them could place one adapter on two replicas (with 2
ingress replicas that cost 1.167 and 1.2 loads per adapter under bursts, `python -m
loadtest.affinity --ingress-replicas 2`). So a router claims its placement in the app's
registry actor (`serve.registry.PlacementClaims`), where the first claim for an adapter wins
and the others take it: one actor call for the first request for a new adapter in each router,
beside a load that takes far longer. When the registry does not answer within
`CLAIM_TIMEOUT_S`, the router's own placement stands. Other replicas come in only once the
preferred ones are full.

A hot adapter spreads: when every replica holding it has at least `spread_queue_gap` more
requests in flight than the least busy other replica, the request goes to that other replica,
which loads the adapter too (a slot load costs far less than waiting behind several
generations). Only adapters a replica reports spread; a placement whose load has not started
does not, or a burst for a new adapter would load it everywhere. A request counts on a replica
from the moment it is handed that replica, before Serve sends it, so the requests of a burst,
decided one after another, see each other: 12 at once for an adapter one of 2 replicas holds
go 8 and 4. Requests without an adapter go by Serve's default policy: its locality preference,
then the less loaded of two random replicas.

Written on Serve's public request-router API (`ray.serve.request_router`): `choose_replicas`
ranks the replicas, the lifecycle hooks (`on_send_request`, `on_request_completed`,
`on_new_queue_len_info`, `on_replica_actor_died`) keep the counts, and the replicas'
`multiplexed_model_ids` and the router's `replica_queue_len_cache` are read. It takes no
`FIFOMixin`: without it Serve hands the replica a routing task finds to the very request it
was found for, so a replica chosen for an adapter never goes to a request for another one
(Serve's FIFO policy would hand it to the oldest pending request of any adapter, which would
then load its adapter there). `LocalityMixin` gives requests without adapter Serve's locality
preference. tests/test_adapter_routing.py (its decisions) and tests/test_routing_serving.py (in
Serve) cover it against the Ray installed. It needs Ray 2.60: before, a routing task could
give up a request it had taken, which only a FIFO router's other tasks would serve (under Ray
2.59 and 2.58 a request of a burst waited for ever). So it is used under the Ray minor
versions it was tested with (`ROUTER_RAY_VERSIONS`, as pyproject.toml pins), and under any
other `serve.app` leaves Serve's default router.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping

from ray.serve.request_router import (
    LocalityMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from serve.registry import drop_stale, registry_for

# The Ray minor versions this router's tests passed under (pyproject.toml's range).
ROUTER_RAY_VERSIONS = ("2.60",)

# How long a router waits for the registry's answer to a claim before its own placement stands.
CLAIM_TIMEOUT_S = 0.5
# A placement only has to outlive one first load and its report to the router; a load from a
# remote store can take a while, and a placement kept too long costs nothing worse than the
# load Serve's own fallback would make.
PLACEMENT_TTL_S = 120.0
# Bounds the router's memory under a stream of distinct cold adapters.
MAX_PLACEMENTS = 4096
# More requests in flight on every holder of an adapter than on the least busy other replica,
# from which the adapter spreads there: 4 generations' wait against one slot load.
DEFAULT_SPREAD_QUEUE_GAP = 4
# A replica handed to a request is sent it within a turn or two of the event loop; a request
# not sent this long after the router last chose for it (its caller went away) stops counting.
PICK_TTL_S = 5.0
# How long a replica's count of its requests (every router's), from its answer to one of this
# router's sends or probes, stays part of this router's count. Serve keeps the number in its
# queue-length cache until this router next hears from the replica, taking off only this
# router's own completions: once another router's requests there have ended, an old answer
# would make the replica look crowded and spread its adapters for nothing (seen as repeat
# requests missing behind 2 ingress replicas, tests/test_routing_serving.py).
REPORT_FRESH_S = 1.0


def router_supported(ray_version: str) -> bool:
    """Whether this router may run under a Ray of this version (its major.minor is tested)."""
    return ".".join(ray_version.split(".")[:2]) in ROUTER_RAY_VERSIONS


def rendezvous_score(adapter_key: str, replica_id: str) -> int:
    """The adapter's affinity for a replica: highest-random-weight hashing, so each router
    ranks replicas alike for an adapter, and a replica joining or leaving moves only the
    adapters it ranks first."""
    digest = hashlib.blake2b(f"{adapter_key}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def placement_for(
    adapter_key: str,
    replicas: Iterable[RunningReplica],
    placed_counts: Mapping[str, int] | None = None,
) -> RunningReplica:
    """The replica that should load an adapter none holds: the fewest adapters held or placed
    there and not yet reported (`placed_counts`, by replica id), then the highest rendezvous
    score."""
    placed_counts = placed_counts or {}

    def rank(replica: RunningReplica) -> tuple[int, int]:
        replica_id = replica.replica_id.unique_id
        adapters = len(replica.multiplexed_model_ids) + placed_counts.get(replica_id, 0)
        return adapters, -rendezvous_score(adapter_key, replica_id)

    return min(replicas, key=rank)


def with_id(replicas: Iterable[RunningReplica], unique_id: str) -> RunningReplica | None:
    """The replica of `replicas` with that unique id, if one is."""
    return next((r for r in replicas if r.replica_id.unique_id == unique_id), None)


def handed_replica(request: PendingRequest) -> ReplicaID | None:
    """The replica Serve has handed a pending request (its future's result), if any yet."""
    future = request.future
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result().replica_id


class AdapterAffinityRouter(LocalityMixin, RequestRouter):
    """See the module docstring. Serve builds one per deployment handle, in the process that
    holds the handle (the ingress replica), and calls it on that process's event loop."""

    def initialize_state(self, spread_queue_gap: int = DEFAULT_SPREAD_QUEUE_GAP) -> None:
        """`spread_queue_gap` comes from the deployment's `request_router_kwargs`."""
        if isinstance(spread_queue_gap, bool) or not isinstance(spread_queue_gap, int):
            raise TypeError(f"spread_queue_gap must be an integer, not {spread_queue_gap!r}")
        if spread_queue_gap < 1:
            raise ValueError(f"spread_queue_gap must be at least 1, not {spread_queue_gap}")
        self._spread_queue_gap = spread_queue_gap
        self._in_flight: Counter[ReplicaID] = Counter()
        # Requests this router chose replicas for and has not seen sent, oldest first:
        # id(request) -> (request, monotonic time last chosen for). Those Serve has handed a
        # replica (their future is done) count there until `on_send_request`.
        self._routing: dict[int, tuple[PendingRequest, float]] = {}
        # Per replica, when it last answered with its count of requests (monotonic time).
        self._reported_at: dict[ReplicaID, float] = {}
        # adapter key -> (replica id, monotonic time placed), oldest first
        self._placements: OrderedDict[str, tuple[ReplicaID, float]] = OrderedDict()
        # adapter key -> (its claim in the registry, still unanswered; the replica proposed)
        self._claims_in_flight: dict[str, tuple[asyncio.Future, RunningReplica]] = {}
        self._registry = None  # the app's registry actor (serve/registry.py), on first claim

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None:  # Serve asks for no request from Ray 2.60 on
            return self._two_choices(candidate_replicas, None)
        self._track(pending_request)
        adapter_key = pending_request.metadata.multiplexed_model_id
        if not adapter_key:
            return self._two_choices(candidate_replicas, pending_request)
        # Ranks are tried in order, each replica's queue bound checked; when none accepts,
        # Serve backs off and asks again (without this flag it would ask again at once).
        pending_request.routing_context.should_backoff = True
        if len(candidate_replicas) < 2:
            return [candidate_replicas] if candidate_replicas else []
        holders = [r for r in candidate_replicas if adapter_key in r.multiplexed_model_ids]
        if holders:
            self._placements.pop(adapter_key, None)
            preferred = holders
        else:
            preferred = [await self._placed(adapter_key, candidate_replicas)]
        others = [r for r in candidate_replicas if r not in preferred]
        if holders and others and self._crowded(holders, others):
            return [others, holders]
        # Serve tries the ranks in turn: the other replicas come in only once every preferred
        # one is known to be full, and then the request goes to the least loaded other one:
        # loading an adapter costs less than queueing behind whole generations. An unknown
        # queue is probed (rank one alone), and a full one is known from then on.
        if all(self._full(r) for r in preferred):
            return [preferred, others]
        return [preferred]

    def _track(self, request: PendingRequest) -> None:
        """Note a request chosen for (again: to the end), dropping those not chosen for
        within `PICK_TTL_S` from the front."""
        now = time.monotonic()
        self._routing.pop(id(request), None)
        self._routing[id(request)] = (request, now)
        while now - next(iter(self._routing.values()))[1] >= PICK_TTL_S:
            del self._routing[next(iter(self._routing))]

    def _two_choices(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        """Serve's default policy for a request without adapter: replicas on this node (or
        zone) first where Serve is set to prefer them, then two at random, of which Serve takes
        the one with the shorter queue."""
        local_ids = self.apply_locality_routing(pending_request)
        candidates = [r for r in candidate_replicas if r.replica_id in local_ids]
        return [random.sample(candidates, min(2, len(candidates)))] if candidates else []

    def _full(self, replica: RunningReplica) -> bool:
        in_flight = self.replica_queue_len_cache.get(replica.replica_id)
        return in_flight is not None and in_flight >= replica.max_ongoing_requests

    def _crowded(self, holders: list[RunningReplica], others: list[RunningReplica]) -> bool:
        """Whether every holder has `spread_queue_gap` more requests in flight than the least
        busy other replica."""

        def in_flight(replica: RunningReplica) -> int:
            return self._requests_on(replica.replica_id)

        least_busy_holder = min(map(in_flight, holders))
        return least_busy_holder - min(map(in_flight, others)) >= self._spread_queue_gap

    def _requests_on(self, replica_id: ReplicaID) -> int:
        """The requests a replica has, sent or about to be. This router's own count of those
        it sent is exact for its requests but blind to those of other routers (each ingress
        replica has one); Serve's queue-length cache holds what the replica last reported for
        all routers, plus this router's sends and completions since. The larger: with several
        ingress replicas the own count alone would spread an adapter only once each router had
        the whole gap on its own; but only a count heard within `REPORT_FRESH_S`. Plus the
        requests handed the replica and not yet sent: Serve's routing tasks decide a burst's
        requests one after another without yielding to the tasks that send them, so without
        these the whole burst would be decided against the same counts."""
        own = self._in_flight.get(replica_id, 0)
        reported = self.replica_queue_len_cache.get(replica_id)
        heard_s_ago = time.monotonic() - self._reported_at.get(replica_id, -math.inf)
        sent = own if reported is None or heard_s_ago >= REPORT_FRESH_S else max(own, reported)
        return sent + self._handed_not_sent().get(replica_id, 0)

    def _handed_not_sent(self) -> Counter[ReplicaID]:
        """Per replica, the requests Serve has handed it and not yet sent (dropping those
        cancelled, or not chosen for within `PICK_TTL_S`: their callers went away)."""
        stale_before = time.monotonic() - PICK_TTL_S
        handed: Counter[ReplicaID] = Counter()
        for key, (request, chosen_at) in list(self._routing.items()):
            if chosen_at < stale_before or request.future.cancelled():
                del self._routing[key]
            elif (replica_id := handed_replica(request)) is not None:
                handed[replica_id] += 1
        return handed

    # This router's own count of its requests in flight per replica. Serve's queue-length
    # cache alone would not do: the replicas' answers to each send overwrite it with counts
    # that lag (a debug log of the spreading test showed 1 to 3 while 12 requests were
    # outstanding on one replica).
    def on_send_request(self, replica_id: ReplicaID, *args, **kwargs) -> None:
        super().on_send_request(replica_id, *args, **kwargs)
        self._count_sent(replica_id)

    def _count_sent(self, replica_id: ReplicaID) -> None:
        """A request sent: in the own count from now on, and no longer as one of the requests
        handed that replica (which one does not change the counts)."""
        self._in_flight[replica_id] += 1
        for key, (request, _) in self._routing.items():
            if handed_replica(request) == replica_id:
                del self._routing[key]
                break

    def on_new_queue_len_info(self, replica_id: ReplicaID, *args, **kwargs) -> None:
        super().on_new_queue_len_info(replica_id, *args, **kwargs)
        self._reported_at[replica_id] = time.monotonic()

    def on_request_completed(self, replica_id: ReplicaID, *args, **kwargs) -> None:
        super().on_request_completed(replica_id, *args, **kwargs)
        # Serve also reports a request that failed before it was sent: never below zero.
        if self._in_flight.get(replica_id, 0) > 0:
            self._in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID, *args, **kwargs) -> None:
        super().on_replica_actor_died(replica_id, *args, **kwargs)
        self._in_flight.pop(replica_id, None)
        self._reported_at.pop(replica_id, None)

    async def _placed(self, adapter_key: str, replicas: list[RunningReplica]) -> RunningReplica:
        """Where requests for an adapter no replica reports go: its placement while that
        replica is up and the placement fresh, else a new one, claimed in the registry."""
        now = time.monotonic()
        placed = self._placements.get(adapter_key)
        if placed is not None and now - placed[1] < PLACEMENT_TTL_S:
            for replica in replicas:
                if replica.replica_id == placed[0]:
                    return replica
        if adapter_key not in self._claims_in_flight:
            self._placements.pop(adapter_key, None)
            drop_stale(self._placements, now, PLACEMENT_TTL_S, MAX_PLACEMENTS)
            self._start_claim(adapter_key, replicas)
        # The requests of a burst are routed side by side while a claim is out: they all wait
        # for its one answer, shielded so that one of them going away does not withdraw it.
        claim, proposed = self._claims_in_flight[adapter_key]
        claimed_id = await asyncio.shield(claim)
        return (
            with_id(replicas, claimed_id)
            or with_id(replicas, proposed.replica_id.unique_id)
            or placement_for(adapter_key, replicas)
        )

    def _start_claim(self, adapter_key: str, replicas: list[RunningReplica]) -> None:
        """Propose a replica for a new adapter and claim it in the registry; the answer becomes
        the router's placement."""
        # Adapters placed but not yet reported count where they were placed, and so do those
        # whose claims are still out, so a burst of new adapters (routed side by side while the
        # registry answers) spreads over the replicas instead of all going to one.
        reported = {key for r in replicas for key in r.multiplexed_model_ids}
        placed_counts = Counter(
            replica_id.unique_id
            for key, (replica_id, _) in self._placements.items()
            if key not in reported
        )
        placed_counts.update(
            proposed.replica_id.unique_id for _, proposed in self._claims_in_flight.values()
        )
        proposed = placement_for(adapter_key, replicas, placed_counts)
        claim = asyncio.ensure_future(self._claim(adapter_key, proposed, replicas))

        def settle(claim: asyncio.Future) -> None:
            # Runs before the requests waiting for the claim resume (callbacks run in order).
            del self._claims_in_flight[adapter_key]
            if claim.cancelled() or claim.exception() is not None:
                return
            replica = with_id(replicas, claim.result()) or proposed
            self._placements[adapter_key] = (replica.replica_id, time.monotonic())

        claim.add_done_callback(settle)
        self._claims_in_flight[adapter_key] = (claim, proposed)

    async def _claim(
        self, adapter_key: str, replica: RunningReplica, replicas: list[RunningReplica]
    ) -> str:
        """The replica id the registry holds for this adapter, claiming `replica` if none."""
        candidate_ids = [r.replica_id.unique_id for r in replicas]
        try:
            if self._registry is None:
                self._registry = registry_for(self.app_name)
            call = self._registry.claim_placement.remote(
                replica.replica_id.deployment_id.name,
                adapter_key,
                replica.replica_id.unique_id,
                candidate_ids,
            )
            return await asyncio.wait_for(call, CLAIM_TIMEOUT_S)
        except Exception:  # the registry gone or slow: this router's own placement stands
            self._registry = None
            return replica.replica_id.unique_id
