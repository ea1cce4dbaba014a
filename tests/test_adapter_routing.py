"""Routing by adapter (serve/adapter_router.py): a burst for a new adapter loads it once.

A third app, "routing" at /routing, serves the tiny Flux model on 2 replicas with loraplex's
router and slots for every adapter, so any load beyond one per adapter is the router's doing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from types import SimpleNamespace

import httpx
import pytest

from serve.adapter_router import placement_for, rendezvous_score

PREFIX = "/routing"
ADAPTERS = 4
BURST = 4  # concurrent requests per adapter
SMALL = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2}


def replica(unique_id: str, *adapters: str) -> SimpleNamespace:
    """What placement_for reads of a Serve RunningReplica."""
    return SimpleNamespace(
        replica_id=SimpleNamespace(unique_id=unique_id), multiplexed_model_ids=set(adapters)
    )


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
    assert rendezvous_score("a", "r1") == rendezvous_score("a", "r1")


@pytest.fixture(scope="module")
def routing(ray_cluster, tmp_path_factory):
    """The routing app with its own adapters; removed at the end of the module."""
    from ray import serve

    from loadtest import service
    from loadtest.run_locust import ADAPTER_PATTERN, write_adapters

    lora_root = tmp_path_factory.mktemp("routing-loras")
    model = {
        "name": "flux",
        "family": "flux",
        "model_uri": "tiny://flux",
        "max_adapters_per_replica": ADAPTERS,
        "price_per_gpu_hour": 2.49,
    }
    write_adapters([model], lora_root, ADAPTERS)
    options = {
        "flux": {
            "num_replicas": 2,
            "max_ongoing_requests": ADAPTERS * BURST,  # never full: the router alone decides
            "ray_actor_options": {"num_cpus": 0.25},
        }
    }
    service.deploy({"lora_root": str(lora_root), "models": [model]}, options, "routing", PREFIX)
    names = [ADAPTER_PATTERN.format(family="flux", index=i) for i in range(ADAPTERS)]
    with httpx.Client(base_url=ray_cluster + PREFIX, timeout=300) as client:
        yield client, names
    serve.delete("routing")


def replicas_once_reported(client, loads: int) -> list[dict]:
    """The replicas as /models shows them once their load counters add up to `loads` (each
    replica reports asynchronously), or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        [model] = client.get("/models").json()["models"]
        total = sum(r["adapter_loads"] for r in model["replicas"])
        if total >= loads or time.monotonic() > deadline:
            return model["replicas"]
        time.sleep(0.2)


def test_a_burst_for_new_adapters_loads_each_once_on_one_replica(routing):
    client, names = routing
    bodies = [{**SMALL, "lora_name": name, "seed": i} for name in names for i in range(BURST)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: client.post("/flux-lora", json=body), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert collections.Counter(r.headers["X-LoRA-Cache"] for r in responses)["miss"] >= ADAPTERS
    replicas = replicas_once_reported(client, ADAPTERS)
    assert len(replicas) == 2
    time.sleep(1.0)  # a duplicate load would have been reported by now
    replicas = replicas_once_reported(client, ADAPTERS)
    assert sum(r["adapter_loads"] for r in replicas) == ADAPTERS
    holders = collections.Counter(name for r in replicas for name in r["hot_adapters"])
    assert holders == dict.fromkeys(names, 1)
    # Once loaded, an adapter's requests stay on its replica: no further loads.
    again = [client.post("/flux-lora", json={**SMALL, "lora_name": n}) for n in names * 2]
    assert {r.headers["X-LoRA-Cache"] for r in again} == {"hit"}
    assert sum(r["adapter_loads"] for r in replicas_once_reported(client, ADAPTERS)) == ADAPTERS
