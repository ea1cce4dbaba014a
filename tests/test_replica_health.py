"""A model replica whose pipeline is no longer the model it loaded fails Serve's health check
and is replaced (deployments/replica_health.py), on real Ray and Serve.

The app "health" at /health serves the tiny Flux model on one replica that Serve checks every
second. The replica's environment carries the test-only fault hook: it overwrites a base weight
in place before its third render, once (a marker file). The test then sends the same fixed-seed
request until the replacement answers: the broken replica finds the change before that render
and answers 503 `replica_unavailable` with Retry-After (never a 500, never an image from the
changed weights) until Serve has replaced it, then the new replica gives the bytes of before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import httpx
import pytest

from deployments.replica_health import CORRUPT_AFTER_ENV, FAULT_MARKER_ENV

# Starts an app of its own: left out of `make test-fast`.
pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

APP = "health"
HEALTH_CHECK_PERIOD_S = 1.0
HEALTH_CHECK_TIMEOUT_S = 5.0
CORRUPT_AFTER = 2  # renders before the fault
REPLACED_WITHIN_S = 120.0  # three failed checks, the old replica's drain, a new pipeline
BODY = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2, "seed": 7}


@contextlib.contextmanager
def health_app(base_url: str, root):
    """The app, its client and the fault's marker file; removed at the end."""
    from ray import serve

    from loadtest import service

    (root / "loras").mkdir()
    marker = root / "corrupted"
    env = {name: os.environ[name] for name in service.ENV_PASSED if name in os.environ}
    env.update({CORRUPT_AFTER_ENV: str(CORRUPT_AFTER), FAULT_MARKER_ENV: str(marker)})
    options = {
        "flux": {
            "num_replicas": 1,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
            "ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": env}},
        },
        "Ingress": {"ray_actor_options": {"num_cpus": 0.25}},
    }
    model = {"name": "flux", "family": "flux", "model_uri": "tiny://flux"}
    service.deploy({"lora_root": str(root / "loras"), "models": [model]}, options, APP, f"/{APP}")
    try:
        with httpx.Client(base_url=f"{base_url}/{APP}", timeout=REPLACED_WITHIN_S) as client:
            yield client, marker
    finally:
        serve.delete(APP)


def replica_ids(client) -> set[str]:
    [model] = client.get("/models").json()["models"]
    return {replica["replica_id"] for replica in model["replicas"]}


def outcome_of(response, before: bytes) -> str:
    """'same' or 'changed' bytes for a 200; 'unavailable' for a well-formed 503."""
    if response.status_code == 200:
        return "same" if response.content == before else "changed"
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "replica_unavailable", response.text
    return "unavailable"


def test_a_replica_whose_base_weights_changed_is_replaced_and_serves_the_same_bytes(
    ray_cluster, tmp_path
):
    with health_app(ray_cluster, tmp_path) as (client, marker):
        deadline = time.monotonic() + 30
        while not (first := replica_ids(client)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(first) == 1
        before = client.post("/flux", json=BODY)
        assert before.status_code == 200, before.text
        assert client.post("/flux", json=BODY).content == before.content
        assert not marker.exists()

        # From here every render of the old replica is from the corrupted weights.
        started = time.monotonic()
        seen: list[tuple[float, int, str]] = []
        replaced_s = None
        while not seen or seen[-1][2] != "same":
            response = client.post("/flux", json=BODY)
            elapsed = time.monotonic() - started
            seen.append((elapsed, response.status_code, outcome_of(response, before.content)))
            if replaced_s is None and replica_ids(client) - first:
                replaced_s = time.monotonic() - started
            assert elapsed < REPLACED_WITHIN_S, seen
            if response.status_code == 503:
                time.sleep(0.2)  # as a client honouring Retry-After would, only sooner
        assert marker.exists()

        deadline = time.monotonic() + 30  # the new replica reports itself asynchronously
        while replaced_s is None and time.monotonic() < deadline:
            if replica_ids(client) - first:
                replaced_s = time.monotonic() - started
            time.sleep(0.2)
        now = replica_ids(client)
        assert now and not now & first, (first, now)

        outcomes = [outcome for _, _, outcome in seen]
        assert "changed" not in outcomes, seen  # no image from the changed weights
        assert outcomes[0] == "unavailable", seen  # found before the render after the fault
        detected_s = next((t for t, _, outcome in seen if outcome == "unavailable"), None)
        log.info(
            "fault before render %d; first 503 at %s s, new replica in /models at %.1f s, "
            "first 200 with the bytes of before at %.1f s; %d requests: %s",
            CORRUPT_AFTER + 1,
            None if detected_s is None else f"{detected_s:.1f}",
            replaced_s,
            seen[-1][0],
            len(seen),
            [(round(t, 1), status, outcome) for t, status, outcome in seen],
        )
        assert seen[-1][0] < REPLACED_WITHIN_S
