"""The queue API on a second app beside the session's (tests/queue_app.py), rendering on the
session's flux replica: submit, poll, result bytes and headers equal to the synchronous call's,
cancel, bounds, bad input, webhooks signed, tenants kept apart."""

from __future__ import annotations

import statistics
import time

import pytest

from tests.http_helpers import error_of, renders_interrupted, renders_running, reported
from tests.queue_app import SMALL, TENANT_A, TENANT_B, Webhooks, finished, queue_app

ROUNDS = 5
POLL_S = 0.02
# Slow enough on the tiny Flux to be seen queued and running (about a second or more).
SLOW = {"prompt": "a slow fox", "width": 1024, "height": 1024, "steps": 30}


@pytest.fixture(scope="module")
def queued(ray_cluster, service, lora_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("queue-app")
    with queue_app(ray_cluster, lora_root, folder, "queue-app", max_queued=3, max_running=1) as c:
        yield c


@pytest.fixture(scope="module")
def webhooks():
    hooks = Webhooks()
    yield hooks
    hooks.close()


def words(message: str) -> list[str]:
    return sorted(message.replace(",", " ").split())


def as_key(key: str) -> dict:
    return {"headers": {"Authorization": f"Bearer {key}"}}


def test_a_queued_request_gives_the_synchronous_bytes_and_headers(queued, webhooks):
    body = {**SMALL, "seed": 7}
    sync = queued.post("/flux", json=body)
    assert sync.status_code == 200, sync.text
    submitted = queued.post("/queue/flux", json={**body, "webhook_url": webhooks.url})
    assert submitted.status_code == 202, submitted.text
    links = submitted.json()
    request_id = links["request_id"]
    assert links["status_url"].endswith(f"/queue-app/queue/requests/{request_id}")
    assert links["result_url"] == links["status_url"] + "/result"
    status = finished(queued, request_id)
    result = queued.get(links["result_url"])
    assert status["status"] == "completed" and status["seed"] == 7
    assert result.status_code == 200 and result.content == sync.content
    for header in ("Content-Type", "X-Seed", "X-Model"):
        assert result.headers[header] == sync.headers[header]
    assert set(result.headers) >= {"x-inference-ms", "x-gpu-seconds", "x-cost-usd"}
    [delivered] = webhooks.for_request(request_id)  # signature checked there
    assert delivered["status"] == "completed" and delivered["request_id"] == request_id


def test_the_queue_overhead(queued):
    """Submit-to-result through the queue against the synchronous call for the same request,
    each the median of ROUNDS, printed (pytest -s) for docs/api.md."""
    body = {**SMALL, "seed": 8}
    queued.post("/flux", json=body)  # the flux replica warm for this size
    sync_s, queue_s = [], []
    for _ in range(ROUNDS):
        started = time.monotonic()
        assert queued.post("/flux", json=body).status_code == 200
        sync_s.append(time.monotonic() - started)
        started = time.monotonic()
        request_id = queued.post("/queue/flux", json=body).json()["request_id"]
        assert finished(queued, request_id, poll_s=POLL_S)["status"] == "completed"
        assert queued.get(f"/queue/requests/{request_id}/result").status_code == 200
        queue_s.append(time.monotonic() - started)
    sync_ms, queue_ms = statistics.median(sync_s) * 1000, statistics.median(queue_s) * 1000
    print(
        f"\nqueue overhead ({ROUNDS} rounds, client polling every {POLL_S * 1000:.0f} ms): "
        f"sync {sync_ms:.0f} ms, submit-to-result {queue_ms:.0f} ms, "
        f"overhead {queue_ms - sync_ms:.0f} ms"
    )


def test_a_failed_request_carries_the_synchronous_error(queued, webhooks):
    # Valid at submit (the file exists); the replica refuses it when it loads it.
    body = {**SMALL, "lora_id": "nomatch", "webhook_url": webhooks.url}
    sync = queued.post("/flux", json={k: v for k, v in body.items() if k != "webhook_url"})
    submitted = queued.post("/queue/flux", json=body)
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["request_id"]
    status = finished(queued, request_id)
    assert status["status"] == "failed"
    error = status["error"]
    assert error["code"] == sync.json()["error"]["code"] == "lora_incompatible"
    # The same message, though the replica lists the unmatched keys in no fixed order.
    assert words(error["message"]) == words(sync.json()["error"]["message"])
    assert error_of(queued.get(f"/queue/requests/{request_id}/result"), 409, "conflict")
    [delivered] = webhooks.for_request(request_id)
    assert delivered["error"] == status["error"]


def test_a_webhook_that_fails_leaves_the_result_as_it_is(queued):
    """A receiver that is not there (connection refused on 127.0.0.1): the request completes
    and its result is kept, whatever the deliveries do."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    body = {**SMALL, "seed": 9}
    sync = queued.post("/flux", json=body)
    submitted = queued.post("/queue/flux", json={**body, "webhook_url": url})
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["request_id"]
    assert finished(queued, request_id)["status"] == "completed"
    result = queued.get(f"/queue/requests/{request_id}/result")
    assert result.status_code == 200 and result.content == sync.content


def test_bad_input_is_refused_before_anything_is_kept(queued):
    message = error_of(
        queued.post("/queue/flux", json={**SMALL, "steps": 0}), 422, "invalid_request"
    )
    assert message.startswith("steps:")
    for url, reason in (
        ("http://169.254.169.254/latest", "link-local"),
        ("ftp://127.0.0.1/hook", "scheme"),
        (17, "a URL"),
    ):
        response = queued.post("/queue/flux", json={**SMALL, "webhook_url": url})
        message = error_of(response, 422, "invalid_request")
        assert message.startswith("webhook_url:") and reason in message
    error_of(queued.post("/queue/flux-lora", json=SMALL), 400, "lora_required")
    error_of(queued.post("/queue/nope", json=SMALL), 404, "not_found")
    error_of(queued.get("/queue/requests/q-" + "0" * 32), 404, "not_found")
    error_of(queued.get("/queue/requests/..%2F..%2Fetc"), 404, "not_found")


def test_a_full_queue_is_503_and_requests_cancel_queued_or_running(queued, service):
    interrupted_before = renders_interrupted(service)
    ids = []
    # The first runs until it is cancelled: 150 steps at 1024 px take several seconds here.
    for body in ({**SLOW, "steps": 150}, SLOW, SLOW):
        submitted = queued.post("/queue/flux", json=body)
        assert submitted.status_code == 202, submitted.text
        ids.append(submitted.json()["request_id"])
    full = queued.post("/queue/flux", json=SLOW)
    assert "queue.max_queued" in error_of(full, 503, "overloaded")
    assert full.headers["Retry-After"]
    assert queued.post("/flux", json=SMALL).status_code == 200  # sync keeps working

    first, second, third = ids
    assert reported(lambda: queued.get(f"/queue/requests/{first}").json()["status"], "running")
    # "running" is the queue's word; the cancel below must find the render itself under way.
    assert reported(lambda: renders_running(service), 1) == 1
    assert queued.get(f"/queue/requests/{second}").json()["position"] == 0
    assert queued.get(f"/queue/requests/{third}").json()["position"] == 1
    cancelled = queued.delete(f"/queue/requests/{third}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert queued.delete(f"/queue/requests/{first}").json()["status"] == "cancelled"
    # The running render stops early, as for a client that went away.
    assert (
        reported(lambda: renders_interrupted(service), interrupted_before + 1) > interrupted_before
    )
    assert finished(queued, second)["status"] == "completed"
    for request_id in (first, third):
        assert queued.get(f"/queue/requests/{request_id}").json()["status"] == "cancelled"
        error_of(queued.delete(f"/queue/requests/{request_id}"), 409, "conflict")


def test_a_tenant_sees_only_its_own_requests(queued):
    submitted = queued.post("/queue/flux", json=SMALL, **as_key(TENANT_A))
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["request_id"]
    for path in (f"/queue/requests/{request_id}", f"/queue/requests/{request_id}/result"):
        error_of(queued.get(path, **as_key(TENANT_B)), 404, "not_found")
    error_of(queued.delete(f"/queue/requests/{request_id}", **as_key(TENANT_B)), 404, "not_found")
    assert finished(queued, request_id, **as_key(TENANT_A))["status"] == "completed"
    assert queued.get(f"/queue/requests/{request_id}/result", **as_key(TENANT_A)).status_code == 200


def test_store_leases_and_retention(tmp_path):
    """Without Ray: one claim at a time until its lease lapses; finished requests go after
    their retention, unfinished ones stay."""
    from deployments.errors import NotFound
    from serve.queue.store import QueueStore, new_request_id

    store = QueueStore(str(tmp_path), "app")
    requests = []
    for n in range(2):
        request = {"request_id": new_request_id(), "deployment": "flux", "submitted_ns": n}
        store.submit(request)
        requests.append(request)
    assert [i for _, i in store.pending("flux")] == [r["request_id"] for r in requests]
    done, waiting = (r["request_id"] for r in requests)
    assert store.claim(done, "one", lease_s=0.3)
    assert not store.claim(done, "two", lease_s=0.3)
    assert store.renew(done, "one", lease_s=0.3) and not store.renew(done, "two", lease_s=0.3)
    time.sleep(0.4)
    assert store.claim(done, "two", lease_s=0.3) and not store.renew(done, "one", lease_s=0.3)

    store.set_status(done, {"status": "completed", "finished_at": time.time() - 20})
    store.finish(requests[0])
    assert [i for _, i in store.pending("flux")] == [waiting]
    assert store.remove_expired(retention_s=10) == 1
    assert store.status(waiting) == {"status": "queued"}
    with pytest.raises(NotFound, match="no queued request"):
        store.status(done)
