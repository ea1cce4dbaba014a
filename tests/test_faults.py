"""Faults survived: SIGKILL of a model replica, the ingress, the registry and Serve's proxy, each
while requests are in flight, on a Ray cluster and Serve app of this module's own (one node,
Serve on 127.0.0.1, tests/cluster_helpers.py) with two flux replicas, so a request whose replica
died has somewhere to be retried.

For each fault: what each request in flight got, the first 200 after the kill (the recovery),
when `/models` lists exactly the live replicas again, that the same request (same seed, same
LoRA) gives the same bytes as before, and that the hot adapter is hot again. `-s` prints a row
per fault.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.cluster_helpers import multinode_cluster, wait_for

# Starts a cluster of its own: left out of `make test-fast`.
pytestmark = pytest.mark.slow

APP = "faults"
LORAS = ["character-a", "character-b"]
# About a fifth of a second per render on this machine's tiny Flux: four requests for one
# adapter are still in flight when the kill comes a quarter second after they were sent.
BODY = {"prompt": "a red fox in the snow", "width": 512, "height": 512, "steps": 24, "seed": 7}
IN_FLIGHT = 4
KILL_AFTER_S = 0.25
# Serve checks each replica this often (its default is 10 s): a killed replica is found dead,
# and replaced, within it.
HEALTH_CHECK_PERIOD_S = 2.0
REQUEST_TIMEOUT_S = 120.0


def lora_body(name: str, seed: int = BODY["seed"]) -> dict:
    return {**BODY, "seed": seed, "lora_name": f"{name}.safetensors"}


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, tiny_pipelines):
    from deployments.loras.synthetic import lora_tensors, write_lora

    root = tmp_path_factory.mktemp("fault-loras")
    transformer = tiny_pipelines("flux").transformer
    for seed, name in enumerate(LORAS, start=1):
        write_lora(root / f"{name}.safetensors", lora_tensors(transformer, "transformer", seed))
    return root


@pytest.fixture(scope="module")
def app(lora_root):
    """The loraplex app on a one-node cluster: two flux replicas, one ingress; the cluster, an
    HTTP client, and the bytes of each LoRA's request before any fault."""
    from loadtest import service

    models = [
        {
            "name": "flux",
            "family": "flux",
            "model_uri": "tiny://flux",
            "max_adapters_per_replica": len(LORAS),
        }
    ]
    checked = {"health_check_period_s": HEALTH_CHECK_PERIOD_S}
    options = {
        "flux": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}, **checked},
        "Ingress": {"ray_actor_options": {"num_cpus": 0.25}, **checked},
    }
    with multinode_cluster(serving_nodes=0, a100_nodes=0) as cluster:
        service.deploy({"lora_root": str(lora_root), "models": models}, options, APP)
        with httpx.Client(base_url=cluster.url, timeout=REQUEST_TIMEOUT_S) as client:
            before = {}
            for name in LORAS:
                response = client.post("/flux-lora", json=lora_body(name))
                assert response.status_code == 200, response.text
                before[name] = response.content
            yield cluster, client, before


@dataclass
class Outcome:
    """What one request got: its status (or the exception's name), when it ended."""

    sent: float
    ended: float
    status: int | str
    headers: dict = field(default_factory=dict)
    body: bytes = b""


@dataclass
class FaultRun:
    killed_at: float
    in_flight: list[Outcome]
    recovery_s: float
    probe: httpx.Response

    def statuses(self) -> dict:
        return dict(collections.Counter(o.status for o in self.in_flight))


def _post(url: str, body: dict) -> Outcome:
    sent = time.monotonic()
    try:
        r = httpx.post(f"{url}/flux-lora", json=body, timeout=REQUEST_TIMEOUT_S)
        return Outcome(sent, time.monotonic(), r.status_code, dict(r.headers), r.content)
    except httpx.HTTPError as e:  # the proxy's own connections die with it
        return Outcome(sent, time.monotonic(), type(e).__name__)


def under_fault(url: str, kill, recovery_timeout_s: float) -> FaultRun:
    """IN_FLIGHT requests for LORAS[0], `kill()` while they run, then the reference request
    again until it answers 200 (a request sent after the kill, so it measures the recovery)."""
    outcomes: list[Outcome] = []
    threads = [
        threading.Thread(target=lambda i=i: outcomes.append(_post(url, lora_body(LORAS[0], i))))
        for i in range(IN_FLIGHT)
    ]
    for thread in threads:
        thread.start()
    time.sleep(KILL_AFTER_S)
    kill()
    killed_at = time.monotonic()
    deadline = killed_at + recovery_timeout_s
    while (probe := _post(url, lora_body(LORAS[0]))).status != 200:
        assert time.monotonic() < deadline, f"no 200 within {recovery_timeout_s} s: {probe}"
        time.sleep(0.2)
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S)
    in_flight = [o for o in outcomes if o.ended > killed_at]
    assert len(in_flight) >= 2, "the kill came after the requests had ended"
    first_ok = min(o.ended for o in [*in_flight, probe] if o.status == 200)
    response = httpx.Response(200, headers=probe.headers, content=probe.body)
    return FaultRun(killed_at, in_flight, first_ok - killed_at, response)


def report(fault: str, run: FaultRun, models_right_s: float) -> None:
    print(
        f"\n{fault:<14} in flight: {run.statuses()}  first 200 after {run.recovery_s:.1f} s  "
        f"/models right after {models_right_s:.1f} s"
    )


def assert_clear_503_or_200(outcome: Outcome) -> None:
    if outcome.status == 200:
        return
    assert outcome.status == 503, (outcome.status, outcome.body[:300])
    assert outcome.headers["retry-after"]
    assert outcome.headers["content-type"] == "application/json"
    assert httpx.Response(503, content=outcome.body).json()["error"]["code"]


def actors(cluster, class_name: str) -> list:
    from ray.util.state import list_actors

    return list_actors(
        address=cluster.address,
        filters=[("state", "=", "ALIVE"), ("class_name", "=", class_name)],
        detail=True,
        limit=1000,
    )


def live_flux_ids(cluster) -> set[str]:
    """The flux replicas Ray runs, by the replica id that ends their actor's name."""
    return {a.name.rpartition("#")[2] for a in actors(cluster, f"ServeReplica:{APP}:flux")}


def flux_replicas(client) -> list[dict]:
    response = client.get("/models")
    assert response.status_code == 200, response.text
    [flux] = [m for m in response.json()["models"] if m["name"] == "flux"]
    return flux["replicas"]


def models_right(cluster, client, since: float, timeout_s: float = 60) -> float:
    """Seconds from `since` until /models lists exactly the two live flux replicas."""

    def right(_) -> bool:
        live = live_flux_ids(cluster)
        return len(live) == 2 and {r["replica_id"] for r in flux_replicas(client)} == live

    assert right(wait_for(lambda: None, right, timeout_s=timeout_s)), flux_replicas(client)
    return time.monotonic() - since


def sigkill(actor) -> None:
    os.kill(actor.pid, signal.SIGKILL)


def test_killed_registry_is_back_under_its_name_and_lists_every_replica(app):
    cluster, client, before = app
    [registry] = actors(cluster, "ReplicaRegistry")
    run = under_fault(cluster.url, lambda: sigkill(registry), recovery_timeout_s=30)
    for outcome in run.in_flight:  # generation never waits on the registry
        assert outcome.status == 200, outcome.body[:300]
    # Ray restarted it (a new process, the same name); the replicas' heartbeats refilled it.
    right_s = models_right(cluster, client, run.killed_at, timeout_s=15)
    [restarted] = actors(cluster, "ReplicaRegistry")
    assert restarted.pid != registry.pid
    hot = {name for r in flux_replicas(client) for name in r["hot_adapters"]}
    assert {f"{name}.safetensors" for name in LORAS} <= hot
    report("registry", run, right_s)
    assert run.probe.content == before[LORAS[0]]


def test_a_registry_killed_for_good_is_created_again_by_name(app):
    import ray

    from deployments.replica_reports import NAMESPACE, registry_name

    cluster, client, _ = app
    ray.kill(ray.get_actor(registry_name(APP), namespace=NAMESPACE), no_restart=True)
    killed_at = time.monotonic()
    # The ingress and the replicas hold a dead handle: each looks the name up again, and the
    # first to do so creates the registry, which the replicas' next beats fill.
    right_s = models_right(cluster, client, killed_at, timeout_s=30)
    print(f"\nregistry killed for good: /models right after {right_s:.1f} s")


def test_killed_model_replica_its_requests_are_retried_on_the_other(app):
    cluster, client, before = app
    hot = f"{LORAS[0]}.safetensors"
    listed = flux_replicas(client)
    holder = next(r["replica_id"] for r in listed if hot in r["hot_adapters"])
    [victim] = [a for a in actors(cluster, f"ServeReplica:{APP}:flux") if a.name.endswith(holder)]
    run = under_fault(cluster.url, lambda: sigkill(victim), recovery_timeout_s=30)
    for outcome in run.in_flight:  # each retried once on the other replica, or a clear 503
        assert_clear_503_or_200(outcome)
    ids = wait_for(
        lambda: {r["replica_id"] for r in flux_replicas(client)},
        lambda ids: holder not in ids,
        timeout_s=15,
    )
    left_s = time.monotonic() - run.killed_at
    assert holder not in ids
    right_s = models_right(cluster, client, run.killed_at)
    # The replacement loads the deployment's recent adapters as it starts (warm start).
    old_ids = {r["replica_id"] for r in listed}
    new = wait_for(
        lambda: [r for r in flux_replicas(client) if r["replica_id"] not in old_ids],
        lambda rs: len(rs) == 1 and hot in rs[0]["hot_adapters"],
        timeout_s=30,
    )
    assert len(new) == 1 and hot in new[0]["hot_adapters"], new
    report("model replica", run, right_s)
    print(f"{'':<14} the killed replica left /models after {left_s:.1f} s")
    assert run.probe.content == before[LORAS[0]]
    for name in LORAS:
        assert client.post("/flux-lora", json=lora_body(name)).content == before[name]


def test_killed_ingress_is_replaced_and_finds_the_same_registry(app):
    cluster, client, before = app
    [ingress] = actors(cluster, f"ServeReplica:{APP}:Ingress")
    run = under_fault(cluster.url, lambda: sigkill(ingress), recovery_timeout_s=60)
    for outcome in run.in_flight:
        if outcome.status == 500:
            # Serve's proxy answers a request whose ingress died with its own plain-text 500:
            # the ingress that would have answered in JSON is the process that was killed.
            assert outcome.headers["content-type"].startswith("text/plain"), outcome
        else:
            assert_clear_503_or_200(outcome)
    # The new ingress finds the registry by name: every replica listed at its first answer.
    assert {r["replica_id"] for r in flux_replicas(client)} == live_flux_ids(cluster)
    report("ingress", run, time.monotonic() - run.killed_at)
    assert run.probe.content == before[LORAS[0]]


def test_killed_proxy_comes_back(app):
    cluster, client, before = app
    [proxy] = actors(cluster, "ProxyActor")
    run = under_fault(cluster.url, lambda: sigkill(proxy), recovery_timeout_s=90)
    for outcome in run.in_flight:
        # Its TCP connections die with the process: no answer can reach those clients.
        assert outcome.status == 200 or isinstance(outcome.status, str), outcome
    assert {r["replica_id"] for r in flux_replicas(client)} == live_flux_ids(cluster)
    report("proxy", run, time.monotonic() - run.killed_at)
    assert run.probe.content == before[LORAS[0]]


def test_a_registry_ends_once_its_app_is_gone(app):
    import ray

    from deployments.replica_reports import NAMESPACE
    from serve.registry import ReplicaRegistry

    name = "replicas-no-such-app"
    registry = ReplicaRegistry.options(name=name, namespace=NAMESPACE, lifetime="detached").remote(
        "no-such-app", app_check_s=0.2
    )
    ray.get(registry.report.remote({"replica_id": "r", "deployment": "flux"}, 1))

    def found() -> bool:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
            return True
        except ValueError:
            return False

    assert wait_for(found, lambda alive: not alive, timeout_s=15) is False
