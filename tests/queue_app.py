"""A second app for the queue tests: an ingress of its own (its queue root, small bounds, short
leases, webhooks to 127.0.0.1 allowed, keys with tenants), sending generations to the session
app's flux deployment, as tests/keyed_app.py does."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.server
import json
import threading
import time
from pathlib import Path

SECRET_ENV = "LORAPLEX_WEBHOOK_SECRET"
SECRET = "test-webhook-secret"
ADMIN, TENANT_A, TENANT_B = "queue-admin", "queue-tenant-a", "queue-tenant-b"
API_KEYS = [
    ADMIN,
    {"key": TENANT_A, "scopes": ["generate"], "tenant": "a"},
    {"key": TENANT_B, "scopes": ["generate"], "tenant": "b"},
]
SMALL = {"prompt": "a red fox", "width": 256, "height": 256, "steps": 2}


@contextlib.contextmanager
def queue_app(ray_cluster: str, lora_root: Path, folder: Path, name: str, **queue):
    """An httpx client (admin key) for the app `name` at /<name>; `queue` overrides its queue
    section. Removed after."""
    import httpx
    from ray import serve

    from serve.config import AppConfig
    from serve.ingress import Ingress

    config = AppConfig.model_validate(
        {
            "lora_root": str(lora_root),
            "dataset_root": str(folder / "datasets"),
            "train_storage_path": str(folder / "train"),
            "models": [{"name": "flux", "family": "flux"}],
            "api_keys": API_KEYS,
            "queue": {
                "root": str(folder / "queue"),
                "poll_s": 0.1,
                "webhook_retry_s": 5,
                "webhooks": {
                    "allowed_schemes": ["http"],
                    "allowed_networks": ["127.0.0.1/32"],
                    "allowed_ports": "any",
                },
                **queue,
            },
        }
    )
    flux = serve.get_deployment_handle("flux", app_name="loraplex")
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {SECRET_ENV: SECRET}}},
        # A killed replica (tests/test_queue_restart.py) is found and replaced within seconds.
        health_check_period_s=1.0,
    )
    serve.run(
        ingress.bind(config.model_dump(mode="json"), {"flux": flux}),
        name=name,
        route_prefix=f"/{name}",
    )
    headers = {"Authorization": f"Bearer {ADMIN}"}
    try:
        with httpx.Client(base_url=f"{ray_cluster}/{name}", timeout=300, headers=headers) as c:
            yield c
    finally:
        serve.delete(name)


def finished(
    client, request_id: str, timeout_s: float = 120, poll_s: float = 0.05, **kwargs
) -> dict:
    """The request's status once it is no longer queued or running."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get(f"/queue/requests/{request_id}", **kwargs).json()
        if status["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


class Webhooks:
    """A webhook receiver on 127.0.0.1: (headers, body) of every POST and when it came, and a
    check of its signature as docs/api.md says a receiver should. It answers 500 to its first
    `failures` POSTs, 204 after."""

    def __init__(self, failures: int = 0):
        self.received: list[tuple[dict, bytes]] = []
        self.times: list[float] = []
        hooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hooks.received.append((dict(self.headers), body))
                hooks.times.append(time.monotonic())
                self.send_response(500 if len(hooks.received) <= failures else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def for_request(self, request_id: str, timeout_s: float = 30) -> list[dict]:
        """The verified bodies delivered for `request_id` (waits for the first)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [b for h, b in self.received if h["X-Loraplex-Request-Id"] == request_id]
            if found:
                break
            time.sleep(0.05)
        bodies = []
        for headers, body in self.received:
            if headers["X-Loraplex-Request-Id"] != request_id:
                continue
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["X-Loraplex-Signature"], expected)
            bodies.append(json.loads(body))
        return bodies
