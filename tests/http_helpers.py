"""Helpers for tests that talk to the running service over HTTP: decoded images, error bodies,
and replica state that the replicas report asynchronously."""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image


def pixels(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


def error_of(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert response.headers["X-Request-Id"]
    return body["error"]["message"]


def flux_replica(service, loads_at_least: int = 0) -> dict:
    """The flux replica as /models shows it, once it has reported `loads_at_least` adapter
    loads (replicas report asynchronously), or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        [flux] = [m for m in service.get("/models").json()["models"] if m["name"] == "flux"]
        [replica] = flux["replicas"]
        if replica["adapter_loads"] >= loads_at_least or time.monotonic() > deadline:
            return replica
        time.sleep(0.1)


def renders_interrupted(client) -> int:
    """Pipeline calls the flux replicas stopped early, as /models shows them."""
    [model] = [m for m in client.get("/models").json()["models"] if m["name"] == "flux"]
    return sum(replica["renders_interrupted"] for replica in model["replicas"])


def renders_running(client) -> int:
    """Pipeline calls under way on the flux replicas, as /models shows them."""
    [model] = [m for m in client.get("/models").json()["models"] if m["name"] == "flux"]
    return sum(replica["renders_running"] for replica in model["replicas"])


def reported(read, expected, timeout_s: float = 60):
    """`read()` once it gives `expected` (the replicas report their state asynchronously), or
    what it gives after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (now := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return now
