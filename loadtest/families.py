"""One request per served model at its production defaults, over HTTP, and each replica's memory.

    python -m loadtest.families --url http://127.0.0.1:8000

Each model gets a warm-up request, then a timed one; the table gives the HTTP latency, the
pipeline time the replica reports (X-Inference-Ms), the response size, and the resident memory
of each replica as /models reports it.
"""

from __future__ import annotations

import argparse
import base64
import io
import time

import httpx
import numpy as np
from PIL import Image

EDIT_INPUT_SIZE = (1024, 768)


def edit_input() -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (*EDIT_INPUT_SIZE[::-1], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    with httpx.Client(base_url=args.url, timeout=900) as client:
        models = client.get("/models").json()["models"]
        print("| model | endpoint | HTTP ms | X-Inference-Ms | bytes | replica RSS MB |")
        print("|---|---|---|---|---|---|")
        for model in models:
            body = {"prompt": "a lighthouse at dusk", "seed": 1}
            if model["family"] == "qwen_image_edit":
                body["image"] = edit_input()
            path = model["endpoints"][0]
            client.post(path, json=body).raise_for_status()  # warm-up
            started = time.perf_counter()
            response = client.post(path, json=body)
            http_ms = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            rss = [r["rss_mb"] for r in model_replicas(client, model["name"])]
            print(
                f"| {model['name']} | {path} | {http_ms:.0f} | "
                f"{response.headers['X-Inference-Ms']} | {len(response.content)} | {rss} |"
            )


def model_replicas(client: httpx.Client, name: str) -> list[dict]:
    models = client.get("/models").json()["models"]
    return next(m["replicas"] for m in models if m["name"] == name)


if __name__ == "__main__":
    main()
