"""A second loraplex app on the session's Serve, under /small: one tiny Flux model, roots of its
own (what is fuzzed or flooded there never touches the session's files) and small queue
bounds. The back-pressure and API-schema tests use it; each module deploys it and deletes it
after, so no other test sees its replicas (in /models or in the metrics)."""

from __future__ import annotations

import contextlib

PREFIX = "/small"
APP = "loraplex-small"
# The ingress works on 8 requests at once; Flux's replica takes Serve's default 5 and queues 2.
BACK_PRESSURE = {
    "ingress_max_ongoing_requests": 8,
    "ingress_max_queued_requests": 32,
    "model_max_queued_requests": 2,
}


# The app's models; tests/test_api_schema.py describes the API for them.
MODELS = [{"name": "flux", "family": "flux", "model_uri": "tiny://flux"}]


@contextlib.contextmanager
def small_app(ray_cluster: str, root):
    """The app's base URL while it runs; `root` (a folder) holds its LoRA, dataset and
    training roots."""
    from ray import serve

    from serve.app import build_app

    args = {
        "models": MODELS,
        "lora_root": str(root / "loras"),
        "dataset_root": str(root / "datasets"),
        "train_storage_path": str(root / "train"),
        "max_body_bytes": 1024 * 1024,
        "back_pressure": BACK_PRESSURE,
    }
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    try:
        yield f"{ray_cluster}{PREFIX}"
    finally:
        serve.delete(APP)
