"""Locust users against a running loraplex: generation endpoints, Zipf-popular adapters.

    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 2m --host http://127.0.0.1:8000

(`make loadtest` starts a service, writes the adapters and runs this: loadtest/run_locust.py.)
Each request picks an endpoint by weight, then either the base model (`LORAPLEX_BASE_SHARE` of
requests) or one of the endpoint's `LORAPLEX_ADAPTERS` adapters, the k-th with probability
proportional to 1/k^`LORAPLEX_ZIPF`. Adapters are files in the service's LoRA root named by
`LORAPLEX_ADAPTER_PATTERN` (`{family}` and `{index}` filled in). Settings, from the environment:

  LORAPLEX_ENDPOINTS        endpoint=weight list, e.g. "flux=3,sdxl=1"; default: every model
                            /models lists, weight 1
  LORAPLEX_ADAPTERS         adapters per endpoint (16)
  LORAPLEX_ZIPF             Zipf exponent of adapter popularity (1.1)
  LORAPLEX_BASE_SHARE       share of requests without adapter (0.2)
  LORAPLEX_WIDTH/HEIGHT     image size, pixels (128 each); LORAPLEX_STEPS steps (2);
                            LORAPLEX_LENGTH frames for video models (5)
  LORAPLEX_CACHE_STATS      file to write the X-LoRA-Cache hit/miss counts to at the end

The X-LoRA-Cache header of each adapter request is counted, per endpoint, for the hit rate.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
from collections import Counter

import requests
from locust import HttpUser, between, events, task

DEFAULT_PATTERN = "loadtest-{family}-{index:02d}.safetensors"
VIDEO_FAMILIES = ("wan",)
EDIT_FAMILIES = ("qwen_image_edit",)

_cache_counts: Counter = Counter()
_cache_lock = threading.Lock()


def setting(name: str, default: str) -> str:
    return os.environ.get(f"LORAPLEX_{name}", default)


def zipf_weights(count: int, exponent: float) -> list[float]:
    return [1.0 / (k**exponent) for k in range(1, count + 1)]


def parse_endpoints(text: str) -> dict[str, float]:
    """'flux=3,sdxl=1' -> {'flux': 3.0, 'sdxl': 1.0}; a bare name weighs 1."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        weights[name.strip().lstrip("/")] = float(weight or 1)
    return weights


def edit_input_image(size: int) -> str:
    """A small grey PNG, base64, for edit models."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class GenerationUser(HttpUser):
    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        # Untracked (plain requests), so Locust's figures are generation requests only.
        models = requests.get(f"{self.host}/models", timeout=60).json()["models"]
        family_of = {m["endpoints"][0].lstrip("/"): m["family"] for m in models}
        chosen = parse_endpoints(setting("ENDPOINTS", ",".join(family_of)))
        unknown = sorted(set(chosen) - set(family_of))
        if unknown:
            raise ValueError(f"LORAPLEX_ENDPOINTS: unknown {unknown}; served: {list(family_of)}")
        self.endpoints = list(chosen)
        self.endpoint_weights = list(chosen.values())
        self.family_of = family_of
        count = int(setting("ADAPTERS", "16"))
        pattern = setting("ADAPTER_PATTERN", DEFAULT_PATTERN)
        self.adapters = {
            endpoint: [pattern.format(family=family_of[endpoint], index=i) for i in range(count)]
            for endpoint in self.endpoints
        }
        self.adapter_weights = zipf_weights(count, float(setting("ZIPF", "1.1")))
        self.base_share = float(setting("BASE_SHARE", "0.2"))
        self.body = {
            "prompt": "a lighthouse on a cliff at dusk",
            "width": int(setting("WIDTH", "128")),
            "height": int(setting("HEIGHT", "128")),
            "steps": int(setting("STEPS", "2")),
        }
        self.edit_image = None

    @task
    def generate(self) -> None:
        endpoint = random.choices(self.endpoints, self.endpoint_weights)[0]
        family = self.family_of[endpoint]
        body = {**self.body, "seed": random.randrange(2**31)}
        if family in VIDEO_FAMILIES:
            body["length"] = int(setting("LENGTH", "5"))
        if family in EDIT_FAMILIES:
            if self.edit_image is None:
                self.edit_image = edit_input_image(body["width"])
            body["image"] = self.edit_image
        path = f"/{endpoint}"
        if random.random() >= self.base_share:
            body["lora_name"] = random.choices(self.adapters[endpoint], self.adapter_weights)[0]
            path = f"/{endpoint}-lora"
        with self.client.post(path, json=body, name=path, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:300]}")
                return
            cache = response.headers.get("X-LoRA-Cache")
            if cache:
                with _cache_lock:
                    for state in cache.split(","):
                        _cache_counts[(endpoint, state)] += 1


@events.quitting.add_listener
def write_cache_stats(environment, **_kwargs) -> None:
    path = os.environ.get("LORAPLEX_CACHE_STATS")
    if not path:
        return
    per_endpoint: dict[str, dict[str, int]] = {}
    for (endpoint, state), count in _cache_counts.items():
        per_endpoint.setdefault(endpoint, {"hit": 0, "miss": 0})[state] = count
    with open(path, "w") as out:
        json.dump(per_endpoint, out, indent=2)
