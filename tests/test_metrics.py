"""loraplex's metrics reach Ray's Prometheus export: read back from the head node's /metrics
as Prometheus scrapes it, and checked against the counts the replica shows on /models."""

from __future__ import annotations

import concurrent.futures
import shutil
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.http_helpers import flux_replica

SMALL = {"width": 256, "height": 256, "steps": 4}
FLUX_PRICE_PER_GPU_HOUR = 2.49  # cluster/local.yaml


def generate(client, **body):
    return client.post("/flux-lora", json={"prompt": "a red fox", "seed": 7, **SMALL, **body})


def exported(metrics_url: str, replica_id: str) -> dict[str, float]:
    """loraplex's samples for one flux replica, by sample name (`..._total`, `..._count`),
    histogram buckets left out."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name.startswith("ray_loraplex_")
                and labels.get("application") == "loraplex"
                and labels.get("deployment") == "flux"
                and labels.get("replica") == replica_id
                and "le" not in labels
            ):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def test_adapter_and_billing_metrics_reach_the_prometheus_export(service, lora_root, metrics_url):
    # A file no request has used: cold on the replica.
    shutil.copy(lora_root / "character-k.safetensors", lora_root / "character-metric.safetensors")
    assert generate(service, lora_id="a").status_code == 200  # hot before the slow request
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # A long generation holds the replica's lock while the burst arrives, so the burst's
        # requests all find the adapter cold: one reads its file, the others share that read.
        slow = pool.submit(generate, service, lora_id="a", width=1024, height=1024, steps=96)
        time.sleep(0.5)
        burst = [pool.submit(generate, service, lora_id="metric") for _ in range(3)]
        responses = [request.result() for request in burst]
        assert slow.result().status_code == 200
    assert sorted(r.headers["X-LoRA-Cache"] for r in responses) == ["hit", "hit", "miss"]

    def mismatches(replica: dict, values: dict[str, float]) -> list[str]:
        """What the export does not show (yet) of the replica's counts and these requests."""
        wrong = [
            f"{name} {values.get(name, 0.0)} != /models {field} {replica[field]}"
            for name, field in (
                ("ray_loraplex_adapter_cache_hits_total", "adapter_hits"),
                ("ray_loraplex_adapter_evictions_total", "adapter_evictions"),
                ("ray_loraplex_adapter_load_seconds_count", "adapter_loads"),
                ("ray_loraplex_adapter_file_reads_total", "adapter_file_reads"),
                ("ray_loraplex_adapter_file_reads_shared_total", "adapter_file_reads_shared"),
                ("ray_loraplex_adapter_fresh_loads_total", "adapter_fresh_loads"),
                ("ray_loraplex_free_adapter_slots", "free_adapter_slots"),
            )
            # A counter never incremented (no eviction yet) is not exported at all.
            if values.get(name, 0.0) != replica[field]
        ]
        gpu_seconds = values.get("ray_loraplex_gpu_seconds_total", 0.0)
        cost_usd = values.get("ray_loraplex_cost_usd_total", 0.0)
        wrong += [
            check
            for check, failed in (
                ("2 shared reads on /models", replica["adapter_file_reads_shared"] < 2),
                ("a miss", values.get("ray_loraplex_adapter_cache_misses_total", 0) < 1),
                # One pipeline call per request here (flux's max_batch_size is 1).
                ("5 pipeline calls", values.get("ray_loraplex_generation_seconds_count", 0) < 5),
                ("GPU-seconds", gpu_seconds <= 0),
                (
                    f"cost {cost_usd} for {gpu_seconds} GPU-seconds",
                    cost_usd != pytest.approx(gpu_seconds * FLUX_PRICE_PER_GPU_HOUR / 3600),
                ),
            )
            if failed
        ]
        return wrong

    # /models and the export both report asynchronously: the registry on each change, the
    # export every second (tests/conftest.py).
    deadline = time.monotonic() + 30
    while True:
        replica = flux_replica(service)
        wrong = mismatches(replica, exported(metrics_url, replica["replica_id"]))
        if not wrong or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert wrong == []
