"""loraplex on a multi-node Ray cluster (tests/cluster_helpers.py): a CPU-only head with the
ingress, a serving node with 2 logical GPUs, an A100 training node.

Replicas are placed by their GPU share (two half-GPU models share one GPU, a whole-GPU model
takes the other), as Ray's state API and the replicas' own `ray.get_gpu_ids()` show, and bill
that share; a node without CUDA serves on the CPU. Then the serving node is lost under load: a
request that fails is a 503 with Retry-After and a JSON body, the replacement replica comes
back with its predecessor's adapters hot, and a seed gives the same bytes as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time

import httpx
import pytest

from tests.cluster_helpers import HEAD_RESOURCE, MultiNodeCluster, multinode_cluster, wait_for

# Starts a cluster of its own: left out of `make test-fast`.
pytestmark = pytest.mark.slow

MODELS = {  # deployment -> (family, GPU share)
    "flux": ("flux", 0.5),
    "z-image": ("z_image", 0.5),
    "sdxl": ("sdxl", 1.0),
}
# Two adapters the load uses through the node loss, two that nothing asks for after it: those
# can only be hot on the replacement by its warm start.
LOADED = ["character-a", "character-b"]
IDLE = ["character-c", "character-d"]
SMALL = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2, "seed": 7}
LOAD_THREADS = 3
RECOVERY_TIMEOUT_S = 120


# What the node-loss test relies on, checked without a cluster.


def test_every_lost_replica_error_is_a_503_to_retry():
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
    from starlette.requests import Request

    from serve.ingress import app, replica_lost

    # Which of these a handle call raises depends on when the node went (tests below saw both
    # ActorDiedError and ActorUnavailableError); each reaches the same handler.
    for error in (
        ActorDiedError,
        ActorUnavailableError,
        ReplicaUnavailableError,
        DeploymentUnavailableError,
    ):
        handler = next(
            app.exception_handlers[c] for c in error.__mro__ if c in app.exception_handlers
        )
        assert handler is replica_lost, error
    request = Request({"type": "http", "method": "POST", "path": "/flux-lora", "headers": []})
    response = asyncio.run(replica_lost(request, ActorDiedError()))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert json.loads(response.body)["error"] == {
        "code": "replica_unavailable",
        "message": "POST /flux-lora: the replica serving it is gone (ActorDiedError); "
        "retry shortly",
    }


def test_recent_adapters_outlive_replicas_and_stay_bounded():
    from serve.registry import RecentAdapters

    recent = RecentAdapters()

    def report(*names: str) -> None:
        recent.report(
            {"deployment": "flux", "hot_adapters": list(names), "max_adapters_per_replica": 3}
        )

    report("a", "b")
    report("c", "a")  # another replica
    assert recent.of("flux") == ["b", "c", "a"]
    report("d")
    assert recent.of("flux") == ["c", "a", "d"]  # the oldest goes past the replicas' limit
    report()  # a replica starting empty clears nothing
    assert recent.of("flux") == ["c", "a", "d"]
    assert recent.of("sdxl") == []


def test_replicas_of_a_dead_node_leave_the_registry():
    from serve.registry import ReplicaStates

    states = ReplicaStates()
    states.report({"replica_id": "r1", "node_id": "lost"}, 1)
    states.report({"replica_id": "r2", "node_id": "alive"}, 1)
    states.remove_on_nodes(["lost"])
    assert [state["replica_id"] for state in states.snapshot()] == ["r2"]
    states.report({"replica_id": "r1", "node_id": "lost"}, 2)  # a report still in flight
    assert [state["replica_id"] for state in states.snapshot()] == ["r2"]


class _Hot:
    """What warm_start uses of HotAdapters: loads recorded, one file that fails to load."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.loaded

    @contextlib.asynccontextmanager
    async def hold_read(self, use):
        from deployments.errors import LoraIncompatible

        if use.name == "broken":
            raise LoraIncompatible("Failed to load LoRA: broken")
        yield object()

    async def ensure_hot(self, uses, staged, count=True):
        assert not count and set(staged) == {use.key for use in uses}
        self.loaded += [use.key for use in uses]


class _Reports:
    def __init__(self, names=None, error=None) -> None:
        self.names, self.error = names, error

    async def recent_adapters(self, deployment, timeout_s):
        if self.error is not None:
            raise self.error
        return self.names


def test_warm_start_loads_what_it_can_and_skips_the_rest():
    from deployments.errors import LoraNotFound
    from deployments.schemas import LoraRef
    from deployments.warm_start import warm_start

    def resolve(name: str) -> LoraRef:
        if name == "gone":
            raise LoraNotFound(f"LoRA not found: {name}")
        return LoraRef(name=name, version="v2")

    hot = _Hot()
    reports = _Reports(["a", "gone", "broken", "b"])
    loaded = asyncio.run(warm_start("flux", hot, asyncio.Lock(), reports, resolve))
    assert loaded == ["a", "b"]
    assert hot.loaded == ["a@v2", "b@v2"]  # at the version the root holds now
    # Without a registry answer the replica starts cold; past its budget it loads no more.
    no_registry = _Reports(error=TimeoutError())
    assert asyncio.run(warm_start("flux", _Hot(), asyncio.Lock(), no_registry, resolve)) == []
    spent = asyncio.run(warm_start("flux", _Hot(), asyncio.Lock(), reports, resolve, budget_s=-1))
    assert spent == []


# On a cluster.


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, tiny_pipelines):
    from deployments.loras.synthetic import lora_tensors, write_lora

    root = tmp_path_factory.mktemp("multinode-loras")
    transformer = tiny_pipelines("flux").transformer
    for seed, name in enumerate(LOADED + IDLE, start=1):
        write_lora(root / f"{name}.safetensors", lora_tensors(transformer, "transformer", seed))
    return root


@pytest.fixture(scope="module")
def app(lora_root):
    """The loraplex app on the cluster: each model one replica at its GPU share, the ingress on
    the head; an HTTP client for it."""
    from loadtest import service

    models = [
        {
            "name": name,
            "family": family,
            "model_uri": f"tiny://{family}",
            "max_adapters_per_replica": len(LOADED + IDLE),
            "price_per_gpu_hour": 2.49,
        }
        for name, (family, _) in MODELS.items()
    ]
    options = {
        name: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "num_gpus": share}}
        for name, (_, share) in MODELS.items()
    }
    # On the head, beside Serve's proxy: it asks for the head's own resource.
    options["Ingress"] = {"ray_actor_options": {"num_cpus": 0.25, "resources": {HEAD_RESOURCE: 1}}}
    with multinode_cluster() as cluster:
        service.deploy({"lora_root": str(lora_root), "models": models}, options, "loraplex")
        with httpx.Client(base_url=cluster.url, timeout=RECOVERY_TIMEOUT_S) as client:
            yield cluster, client


def replicas(client) -> dict[str, list[dict]]:
    """Each deployment's replicas as /models shows them."""
    return {m["name"]: m["replicas"] for m in client.get("/models").json()["models"]}


def placement_table(cluster: MultiNodeCluster, client) -> list[dict]:
    """Every live actor of the cluster: node, role, actor, GPU share (what Ray reserved for
    it), and for model replicas the GPU ids and device the replica itself reports."""
    from ray.util.state import list_actors

    # Each replica reports itself to the registry once started, which may be just after the
    # app is ready: wait until every model's replica is listed.
    listed = wait_for(
        lambda: replicas(client),
        lambda by_model: all(len(by_model.get(name, [])) == 1 for name in MODELS),
        timeout_s=30,
    )
    reported = {r["replica_id"]: r for rs in listed.values() for r in rs}
    rows = []
    for actor in list_actors(
        address=cluster.address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000
    ):
        replica = reported.get((actor.name or "").rpartition("#")[2], {})
        rows.append(
            {
                "node": actor.node_id[:8],
                "node_id": actor.node_id,
                "role": cluster.role_of(actor.node_id),
                "actor": actor.class_name.removeprefix("ServeReplica:loraplex:"),
                "gpu_share": (actor.required_resources or {}).get("GPU", 0.0),
                "gpu_ids": ",".join(replica.get("gpu_ids", [])) or "-",
                "device": replica.get("device", "-"),
            }
        )
    return sorted(rows, key=lambda row: (row["role"], row["actor"]))


def print_table(rows: list[dict]) -> None:
    columns = ["node", "role", "actor", "gpu_share", "gpu_ids", "device"]
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in columns}
    print()
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


def test_replicas_are_placed_by_their_gpu_share(app):
    from ray.util.state import list_nodes

    cluster, client = app
    rows = placement_table(cluster, client)
    print_table(rows)
    by_actor = {row["actor"]: row for row in rows}
    serving = cluster.node_id(cluster.serving[0])

    # The two half-GPU replicas share one GPU of the serving node, the whole-GPU one the other.
    for name in MODELS:
        assert by_actor[name]["node_id"] == serving, by_actor[name]
        assert by_actor[name]["gpu_share"] == MODELS[name][1]
        assert len(by_actor[name]["gpu_ids"].split(",")) == 1
        # The node has no CUDA: `device: auto` serves on the CPU.
        assert by_actor[name]["device"] == "cpu"
    assert by_actor["flux"]["gpu_ids"] == by_actor["z-image"]["gpu_ids"]
    assert {by_actor["flux"]["gpu_ids"], by_actor["sdxl"]["gpu_ids"]} == {"0", "1"}

    # The head runs Serve's controller and proxy, the ingress and the registry, and no GPU work.
    head_actors = {row["actor"] for row in rows if row["role"] == "head"}
    assert {"ServeController", "ProxyActor", "Ingress", "ReplicaRegistry"} <= head_actors
    assert all(row["gpu_share"] == 0 for row in rows if row["role"] == "head")
    # Nothing of serving on the A100 node.
    assert [row for row in rows if row["role"] == "training"] == []

    roles = {node.node_id: node.labels for node in list_nodes(address=cluster.address)}
    assert roles[serving]["loraplex.io/role"] == "serving"
    assert roles[cluster.node_id(cluster.a100)]["loraplex.io/role"] == "training"


def test_gpu_seconds_bill_the_replicas_share(app):
    _, client = app
    for name, (_, share) in MODELS.items():
        response = client.post(f"/{name}", json=SMALL)
        assert response.status_code == 200, response.text
        inference_s = float(response.headers["X-Inference-Ms"]) / 1000
        # X-Inference-Ms is rounded to 0.1 ms, X-GPU-Seconds to 0.1 ms of GPU time.
        assert float(response.headers["X-GPU-Seconds"]) == pytest.approx(
            inference_s * share, abs=2e-4
        )


def _load(client_url: str, stop: threading.Event, outcomes: list, index: int) -> None:
    """Requests for the LOADED adapters one after another until `stop`; each outcome
    (start, end, status or exception, headers, body of a failure) into `outcomes`."""
    with httpx.Client(base_url=client_url, timeout=RECOVERY_TIMEOUT_S) as client:
        while not stop.is_set():
            body = {**SMALL, "lora_name": f"{LOADED[index % len(LOADED)]}.safetensors"}
            started = time.monotonic()
            try:
                r = client.post("/flux-lora", json=body)
                outcome = (started, time.monotonic(), r.status_code, r.headers, r.content)
            except httpx.HTTPError as e:
                outcome = (started, time.monotonic(), repr(e), {}, b"")
            outcomes.append(outcome)
            index += 1


def test_losing_the_serving_node(app):
    cluster, client = app
    lora = {name: {**SMALL, "lora_name": f"{name}.safetensors"} for name in LOADED + IDLE}
    for body in lora.values():  # every adapter hot on the flux replica
        assert client.post("/flux-lora", json=body).status_code == 200
    before = {
        "base": client.post("/flux", json=SMALL).content,
        IDLE[0]: client.post("/flux-lora", json=lora[IDLE[0]]).content,
    }
    [old] = replicas(client)["flux"]
    assert set(old["hot_adapters"]) == {f"{name}.safetensors" for name in LOADED + IDLE}

    stop, outcomes = threading.Event(), []
    load = [
        threading.Thread(target=_load, args=(cluster.url, stop, outcomes, i))
        for i in range(LOAD_THREADS)
    ]
    for thread in load:
        thread.start()
    wait_for(lambda: len(outcomes), lambda n: n >= 2 * LOAD_THREADS, timeout_s=30, every_s=0.05)
    [lost] = cluster.serving
    removed = time.monotonic()
    cluster.remove(lost)  # at once, as a machine is lost: not drained
    cluster.add_serving_node()
    # Until a request started after the removal has succeeded, and a few more after it.
    wait_for(
        lambda: [o for o in outcomes if o[0] > removed and o[2] == 200],
        lambda ok: len(ok) >= 2 * LOAD_THREADS,
        timeout_s=RECOVERY_TIMEOUT_S,
        every_s=0.1,
    )
    stop.set()
    for thread in load:
        thread.join(RECOVERY_TIMEOUT_S)

    after = [o for o in outcomes if o[1] > removed]
    failed = [o for o in after if o[2] != 200]
    first_ok = min(o[1] for o in after if o[2] == 200) - removed
    print()
    print(f"requests in flight or sent after the removal: {len(after)}, failed: {len(failed)}")
    for status, count in collections.Counter(o[2] for o in after).items():
        print(f"  {status}: {count}")
    for _, end, status, headers, content in failed:
        retry_after = headers.get("Retry-After")
        print(f"  {end - removed:6.2f} s  {status}  Retry-After={retry_after}  {content.decode()}")
    print(f"first 200 after the removal: {first_ok:.2f} s")

    for _, _, status, headers, content in failed:
        # Never a 500, a dropped connection or a timeout: a clear 503 to retry.
        assert status == 503, (status, content)
        assert headers["Retry-After"] == "1"
        assert headers["content-type"] == "application/json"
        assert httpx.Response(503, content=content).json()["error"]["code"] == (
            "replica_unavailable"
        )

    # The replacement reports the IDLE adapters hot, though nothing has asked for them since.
    def new_flux() -> list[dict]:
        return [r for r in replicas(client)["flux"] if r["replica_id"] != old["replica_id"]]

    hot = {f"{name}.safetensors" for name in LOADED + IDLE}
    [new] = wait_for(
        new_flux,
        lambda rs: len(rs) == 1 and hot <= set(rs[0]["hot_adapters"]),
        timeout_s=30,
    )
    assert hot <= set(new["hot_adapters"]), new
    assert new["node_id"] == cluster.node_id(cluster.serving[0])
    assert [r["replica_id"] for r in replicas(client)["flux"]] == [new["replica_id"]]
    print(f"hot on the new replica before any request for them: {sorted(new['hot_adapters'])}")

    response = client.post("/flux-lora", json=lora[IDLE[0]])
    assert response.headers["X-LoRA-Cache"] == "hit"
    assert response.content == before[IDLE[0]]
    assert client.post("/flux", json=SMALL).content == before["base"]
