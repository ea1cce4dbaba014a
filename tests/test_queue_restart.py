"""The queue survives its ingress: the ingress replica is killed between the 202s and the
results; the replica Serve starts in its place runs what was queued and what was running
(once its lease lapses), and nothing is lost or done twice."""

from __future__ import annotations

import time

import pytest

from tests.queue_app import SMALL, Webhooks, queue_app

APP = "queue-restart"
SEEDS = (1, 2, 3)
LEASE_S = 2.0


def kill_ingress() -> None:
    import ray
    from ray.util.state import list_actors

    [ingress] = list_actors(
        address=ray.get_runtime_context().gcs_address,  # this session's cluster, of several
        filters=[("state", "=", "ALIVE"), ("class_name", "=", f"ServeReplica:{APP}:Ingress")],
    )
    ray.kill(ray.get_actor(ingress.name, namespace="serve"), no_restart=True)


def status_after_restart(client, request_id: str, timeout_s: float = 120) -> dict:
    """The request's final status; while the ingress is down, the proxy's errors are waited
    out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get(f"/queue/requests/{request_id}")
        if response.status_code == 200 and response.json()["status"] not in ("queued", "running"):
            return response.json()
        time.sleep(0.1)
    raise AssertionError(f"{request_id} did not finish in {timeout_s} s")


@pytest.mark.slow
def test_an_ingress_restart_loses_and_repeats_nothing(ray_cluster, service, lora_root, tmp_path):
    hooks = Webhooks()
    try:
        with queue_app(
            ray_cluster, lora_root, tmp_path, APP, lease_s=LEASE_S, max_running=1
        ) as client:
            expected = [client.post("/flux", json={**SMALL, "seed": s}).content for s in SEEDS]
            ids = []
            for seed in SEEDS:
                body = {**SMALL, "seed": seed, "webhook_url": hooks.url}
                submitted = client.post("/queue/flux", json=body)
                assert submitted.status_code == 202, submitted.text
                ids.append(submitted.json()["request_id"])
            kill_ingress()
            unfinished_at_kill = len(ids) - len(hooks.received)
            statuses = [status_after_restart(client, request_id) for request_id in ids]
            results = [client.get(f"/queue/requests/{i}/result").content for i in ids]
        deliveries = {i: len(hooks.for_request(i)) for i in ids}
    finally:
        hooks.close()
    queue = tmp_path / "queue" / APP
    print(
        f"\nrestart: {unfinished_at_kill} of {len(ids)} unfinished at the kill; "
        f"{sum(s['status'] == 'completed' for s in statuses)} completed after it; "
        f"webhook deliveries {sorted(deliveries.values())}"
    )
    assert unfinished_at_kill >= 2  # the kill came while the queue held work
    assert [s["status"] for s in statuses] == ["completed"] * len(ids)
    assert results == expected
    assert deliveries == {i: 1 for i in ids}  # each finished once
    assert sorted(p.name for p in (queue / "requests").iterdir()) == sorted(ids)
    assert list((queue / "pending" / "flux").iterdir()) == []
