"""The adapter router's decisions (serve/adapter_router.py), on replicas as Serve describes
them: placement of new adapters, claims shared between routers, spreading a crowded hot
adapter, and the Ray versions it runs under. tests/test_routing_serving.py runs it in Serve."""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.serve.request_router import FIFOMixin

from serve.adapter_router import (
    PICK_TTL_S,
    REPORT_FRESH_S,
    AdapterAffinityRouter,
    placement_for,
    router_supported,
)
from serve.registry import PlacementClaims

BURST = 4  # concurrent requests per adapter


def replica(unique_id: str, *adapters: str) -> SimpleNamespace:
    """What the router reads of a Serve RunningReplica."""
    deployment_id = SimpleNamespace(name="flux", app_name="app")
    return SimpleNamespace(
        replica_id=SimpleNamespace(unique_id=unique_id, deployment_id=deployment_id),
        multiplexed_model_ids=set(adapters),
    )


@pytest.mark.parametrize(
    ("ray_version", "supported"),
    [
        ("2.60.0", True),
        ("2.60.3", True),
        ("2.59.0", False),
        ("2.61.0", False),
        ("3.0.0.dev0", False),
    ],
)
def test_the_router_runs_only_under_the_ray_it_was_tested_with(ray_version, supported):
    assert router_supported(ray_version) is supported


def test_under_another_ray_the_models_get_serves_default_router(monkeypatch, caplog):
    from serve import app

    def router_of(deployment) -> str:  # Serve keeps no public accessor for it
        return deployment._deployment_config.request_router_config.request_router_class

    assert router_of(app.model_deployment()) == "serve.adapter_router.AdapterAffinityRouter"
    monkeypatch.setattr(app.ray, "__version__", "2.61.0")
    assert "AdapterAffinityRouter" not in router_of(app.model_deployment())
    assert "Serve's default router" in caplog.text


@pytest.mark.parametrize("gap", [0, -1, 1.5, "4", True])
def test_spread_queue_gap_must_be_a_positive_integer(gap):
    with pytest.raises((TypeError, ValueError), match="spread_queue_gap"):
        AdapterAffinityRouter.initialize_state(SimpleNamespace(), spread_queue_gap=gap)


def test_placement_prefers_the_replica_with_fewest_adapters():
    busy, idle = replica("r1", "x", "y"), replica("r2", "z")
    assert all(placement_for(f"adapter-{i}", [busy, idle]) is idle for i in range(50))


def test_placement_counts_adapters_placed_but_not_yet_reported():
    first, second = replica("r1", "x"), replica("r2")
    assert placement_for("new", [first, second]) is second
    assert placement_for("new", [first, second], {"r2": 2}) is first


def test_placement_ties_go_by_rendezvous_the_same_in_any_order():
    replicas = [replica(f"r{i}") for i in range(4)]
    keys = [f"adapter-{i}" for i in range(400)]
    first = {key: placement_for(key, replicas).replica_id.unique_id for key in keys}
    again = {key: placement_for(key, replicas[::-1]).replica_id.unique_id for key in keys}
    assert first == again
    counts = collections.Counter(first.values())
    assert len(counts) == 4 and min(counts.values()) >= 70  # about 100 each


def test_a_replica_leaving_moves_only_the_adapters_it_was_first_for():
    replicas = [replica(f"r{i}") for i in range(4)]
    keys = [f"adapter-{i}" for i in range(400)]
    before = {key: placement_for(key, replicas).replica_id.unique_id for key in keys}
    after = {key: placement_for(key, replicas[:3]).replica_id.unique_id for key in keys}
    moved = {key for key in keys if before[key] != after[key]}
    assert moved == {key for key in keys if before[key] == "r3"}


def placing_router(claims: PlacementClaims, calls: list | None = None) -> SimpleNamespace:
    """What `_placed` reads and writes of a router: its placements and claims still out, and
    its claims, made in `claims` as the registry actor makes them (each call's adapter
    appended to `calls`), answered a turn of the event loop later, as an actor call is."""

    async def claim(adapter_key, chosen, replicas) -> str:
        if calls is not None:
            calls.append(adapter_key)
        await asyncio.sleep(0)
        ids = [r.replica_id.unique_id for r in replicas]
        return claims.claim("flux", adapter_key, chosen.replica_id.unique_id, ids)

    router = SimpleNamespace(
        _placements=collections.OrderedDict(),
        _claims_in_flight={},
        _claim=claim,
    )
    router._start_claim = functools.partial(AdapterAffinityRouter._start_claim, router)
    return router


def placed(router: SimpleNamespace, keys: list[str], replicas) -> list[str]:
    async def place_all():
        return [await AdapterAffinityRouter._placed(router, key, replicas) for key in keys]

    return [r.replica_id.unique_id for r in asyncio.run(place_all())]


def test_routers_sharing_claims_place_an_adapter_alike():
    """Each ingress replica has a router, and one that has placed adapters the replicas have
    not reported yet counts them where it placed them: on its own it would place the next new
    adapters elsewhere than a router that has not. Through shared claims, they agree."""
    replicas = [replica("r1", "x"), replica("r2"), replica("r3", "y")]
    keys = [f"adapter-{i}" for i in range(30)]

    def both_place(shared: bool) -> tuple[dict[str, str], dict[str, str]]:
        """Where each router places the same new adapters, taking turns to go first, as the
        two see a burst's requests."""
        claims = PlacementClaims()
        busy = placing_router(claims)
        fresh = placing_router(claims if shared else PlacementClaims())
        placed(busy, [f"earlier-{i}" for i in range(5)], replicas)  # not yet reported
        by_busy, by_fresh = {}, {}
        for i, key in enumerate(keys):
            turns = [(busy, by_busy), (fresh, by_fresh)]
            for router, where in turns if i % 2 else turns[::-1]:
                [where[key]] = placed(router, [key], replicas)
        return by_busy, by_fresh

    by_busy, by_fresh = both_place(shared=False)
    assert by_busy != by_fresh  # each on its own: they disagree
    by_busy, by_fresh = both_place(shared=True)
    assert by_busy == by_fresh


def test_a_burst_of_new_adapters_routed_side_by_side_spreads_over_the_replicas():
    """Serve routes a burst's requests side by side, each waiting for the registry's answer
    to its adapter's claim: the adapters still being claimed count where they were proposed,
    so 8 new adapters go 4 and 4, and each adapter's requests share one claim."""
    replicas = [replica("r1"), replica("r2")]
    keys = [f"adapter-{i}" for i in range(8)]
    calls = []
    router = placing_router(PlacementClaims(), calls)

    async def burst():
        requests = [key for key in keys for _ in range(BURST)]
        placed = await asyncio.gather(
            *(AdapterAffinityRouter._placed(router, key, replicas) for key in requests)
        )
        pairs = {(key, r.replica_id.unique_id) for key, r in zip(requests, placed, strict=True)}
        assert len(pairs) == len(keys)  # each adapter's requests all go to one replica
        return dict(pairs)

    where = asyncio.run(burst())
    assert sorted(collections.Counter(where.values()).values()) == [4, 4]
    assert sorted(calls) == keys
    assert router._claims_in_flight == {}
    assert {key: r.unique_id for key, (r, _) in router._placements.items()} == where


def test_the_first_claim_wins_while_fresh_and_its_replica_is_up():
    claims = PlacementClaims(ttl_s=60)
    assert claims.claim("flux", "a", "r1", ["r1", "r2"]) == "r1"
    assert claims.claim("flux", "a", "r2", ["r1", "r2"]) == "r1"
    assert claims.claim("sdxl", "a", "r2", ["r1", "r2"]) == "r2"  # per deployment
    assert claims.claim("flux", "a", "r2", ["r2", "r3"]) == "r2"  # r1 gone: a new claim
    assert claims.claim("flux", "a", "r3", ["r2", "r3"]) == "r2"
    stale = PlacementClaims(ttl_s=0)
    assert stale.claim("flux", "a", "r1", ["r1", "r2"]) == "r1"
    assert stale.claim("flux", "a", "r2", ["r1", "r2"]) == "r2"
    bounded = PlacementClaims(max_claims=3)
    for i in range(10):
        bounded.claim("flux", f"k{i}", "r1", ["r1"])
    assert len(bounded._claims) == 3


def test_without_an_answer_from_the_registry_the_routers_own_placement_stands():
    calls = []

    def unreachable(*args):
        calls.append(args)
        raise RuntimeError("the registry actor is gone")

    router = SimpleNamespace(
        _registry=SimpleNamespace(claim_placement=SimpleNamespace(remote=unreachable)),
        app_name="app",
    )
    chosen = replica("r2")
    claimed = asyncio.run(
        AdapterAffinityRouter._claim(router, "a", chosen, [replica("r1"), chosen])
    )
    assert calls == [("flux", "a", "r2", ["r1", "r2"])]  # per deployment, with the candidates
    assert claimed == "r2"
    assert router._registry is None  # looked up again at the next claim


def handed(replica_id, chosen_s_ago: float = 0.0, sent: bool = True):
    """A pending request as the router keeps it: Serve has handed it `replica_id` (its future
    done with that replica) when `sent`, and the router last chose for it `chosen_s_ago`."""

    async def make():
        future = asyncio.get_running_loop().create_future()
        if sent:
            future.set_result(SimpleNamespace(replica_id=replica_id))
        return SimpleNamespace(future=future)

    request = asyncio.run(make())
    return request, time.monotonic() - chosen_s_ago


def counting_router(
    own: dict,
    reported: dict,
    picked: dict | None = None,
    gap: int = 4,
    report_age_s: float = 0.0,
):
    """What `_crowded` and `_requests_on` read of a router: its own counts of requests sent,
    Serve's reported queue lengths (heard `report_age_s` ago), and the requests handed a
    replica and not yet sent (`handed` entries, by replica)."""
    reported_at = time.monotonic() - report_age_s
    routing = [entry for entries in (picked or {}).values() for entry in entries]
    router = SimpleNamespace(
        _spread_queue_gap=gap,
        _in_flight=collections.Counter(own),
        replica_queue_len_cache=SimpleNamespace(get=reported.get),
        _reported_at=dict.fromkeys(reported, reported_at),
        _routing={id(request): (request, at) for request, at in routing},
    )
    for method in ("_requests_on", "_handed_not_sent"):
        setattr(router, method, functools.partial(getattr(AdapterAffinityRouter, method), router))
    return router


def crowding(
    own: dict[str, int], reported: dict[str, int], gap: int = 4, picked=None, report_age_s=0.0
):
    """`_crowded` of a router with these own counts and reported queue lengths, by replica."""
    router = counting_router(own, reported, picked, gap, report_age_s)

    def replicas(ids: list[str]) -> list[SimpleNamespace]:
        return [SimpleNamespace(replica_id=replica_id) for replica_id in ids]

    return lambda holders, others: AdapterAffinityRouter._crowded(
        router, replicas(holders), replicas(others)
    )


def test_a_hot_adapter_spreads_on_the_routers_own_count():
    crowded = crowding(own={"holder": 5, "other": 1}, reported={})
    assert crowded(["holder"], ["other"])
    assert not crowding(own={"holder": 4, "other": 1}, reported={})(["holder"], ["other"])


def test_what_replicas_report_counts_when_it_is_more_than_the_routers_own():
    # Two ingress replicas, each with 3 requests on the holder: neither has the gap of 4 on its
    # own, but the holder reports 6.
    crowded = crowding(own={"holder": 3}, reported={"holder": 6, "other": 1})
    assert crowded(["holder"], ["other"])
    # The other replica busy with other routers' requests: no spread.
    assert not crowding(own={"holder": 6}, reported={"other": 3})(["holder"], ["other"])
    # A report lower than the router's own count (it lags) does not lower it.
    assert crowding(own={"holder": 6}, reported={"holder": 1})(["holder"], ["other"])


def test_an_old_report_is_not_counted():
    """The holder answered 6 a while ago, when another router's requests were there too; this
    router has 1 there now. Serve still holds the 6 (less this router's completions)."""
    reported = {"holder": 6, "other": 1}
    assert crowding(own={"holder": 1}, reported=reported, report_age_s=REPORT_FRESH_S / 2)(
        ["holder"], ["other"]
    )
    assert not crowding(own={"holder": 1}, reported=reported, report_age_s=REPORT_FRESH_S)(
        ["holder"], ["other"]
    )


def test_requests_handed_a_replica_count_until_they_are_sent():
    # A burst: 4 requests handed the holder and not yet sent count as its requests.
    crowded = crowding(
        own={"holder": 1}, reported={}, picked={"holder": [handed("holder") for _ in range(3)]}
    )
    assert crowded(["holder"], ["other"])
    two = {"holder": [handed("holder") for _ in range(2)]}
    assert not crowding(own={"holder": 1}, reported={}, picked=two)(["holder"], ["other"])
    # One still being routed (no replica handed yet) does not count, nor one older than
    # PICK_TTL_S (its request went away before it was sent), and the old one is dropped.
    router = counting_router(
        own={},
        reported={},
        picked={
            "r": [handed("r", chosen_s_ago=PICK_TTL_S + 1), handed("r")],
            "": [handed(None, sent=False)],
        },
    )
    assert router._requests_on("r") == 1
    assert len(router._routing) == 2
    # Sent: it counts in the router's own count from then on, no longer as handed.
    AdapterAffinityRouter._count_sent(router, "r")
    assert router._in_flight["r"] == 1 and router._handed_not_sent() == {}
    assert router._requests_on("r") == 1


def test_the_router_is_written_on_serves_public_api():
    """No import of Serve's private modules (issue 20): the router's policy only through
    `ray.serve.request_router`, so a Ray release keeping that API keeps the router working."""
    source = (Path(__file__).parent.parent / "serve" / "adapter_router.py").read_text()
    assert "_private" not in source
    assert "_fulfill_next_pending_request" not in source
    assert not issubclass(AdapterAffinityRouter, FIFOMixin)  # a choice goes to its own request


def test_every_holder_must_be_crowded():
    crowded = crowding(own={"a": 6, "b": 2}, reported={})
    assert not crowded(["a", "b"], ["c"])
    assert crowded(["a"], ["b", "c"])
