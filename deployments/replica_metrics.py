"""Every metric a model replica exports, declared in one place (Ray's Prometheus export names
them `ray_<name>`, counters with `_total`; docs/architecture.md, "Metrics"), and the readings
of its resources that billing and /models use."""

from __future__ import annotations

import os
import resource

import ray
from ray.serve import metrics

SECONDS_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]


class ReplicaMetrics:
    def __init__(self) -> None:
        self.hits = metrics.Counter("loraplex_adapter_cache_hits", "Adapter cache hits.")
        self.misses = metrics.Counter("loraplex_adapter_cache_misses", "Adapter cache misses.")
        self.evictions = metrics.Counter("loraplex_adapter_evictions", "Adapters evicted.")
        self.fresh_loads = metrics.Counter(
            "loraplex_adapter_fresh_loads", "Adapter loads that built new layers (no slot fit)."
        )
        self.free_slots = metrics.Gauge(
            "loraplex_free_adapter_slots", "Evicted adapters' layers kept for the next load."
        )
        self.load_s = metrics.Histogram(
            "loraplex_adapter_load_seconds", "Adapter load time.", boundaries=SECONDS_BUCKETS
        )
        self.generation_s = metrics.Histogram(
            "loraplex_generation_seconds", "Pipeline call time.", boundaries=SECONDS_BUCKETS
        )
        self.gpu_s = metrics.Counter("loraplex_gpu_seconds", "GPU-seconds billed.")
        self.cost = metrics.Counter("loraplex_cost_usd", "USD billed.")
        self.file_reads = metrics.Counter("loraplex_adapter_file_reads", "Cold adapter files read.")
        self.file_reads_shared = metrics.Counter(
            "loraplex_adapter_file_reads_shared", "Requests served by another request's read."
        )
        self.eager_fallbacks = metrics.Counter(
            "loraplex_eager_fallbacks",
            "Renders of a compiled model run eagerly: their stack could not be fused.",
        )


def resident_memory_mb() -> float:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_share() -> float:
    """The GPUs this replica holds (0.5 for a half GPU); 1.0 for a CPU replica, which bills
    its device time the same way."""
    gpus = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    return float(gpus) if gpus > 0 else 1.0
