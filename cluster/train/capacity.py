"""What a training job asks of the cluster, and whether the cluster can ever hold it.

A worker asks for what Ray Train's ScalingConfig asks: CPUs, GPUs with `use_gpu`, and with an
`accelerator_type` a sliver (0.001) of the `accelerator_type:<type>` resource that nodes with
that accelerator declare. Workers are alike, so a node holds as many as each of its resources
allows, and a job fits a set of nodes when their counts add up to `num_workers`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from cluster.train.config import TrainConfig

ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_SHARE = 0.001  # Ray Train's request of the accelerator resource, per worker
# Floating-point slack when dividing a node's resources by a worker's (0.1 + 0.2 CPUs).
EPSILON = 1e-9


def worker_resources(config: TrainConfig) -> dict[str, float]:
    """One worker's resources, as the job asks Ray Train for them."""
    resources = {"CPU": config.worker_cpus}
    if config.use_gpu:
        resources["GPU"] = config.gpus_per_worker
    if config.accelerator_type:
        resources[ACCELERATOR_PREFIX + config.accelerator_type] = ACCELERATOR_SHARE
    return {name: amount for name, amount in resources.items() if amount > 0}


def workers_fitting(node: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    """How many workers of `per_worker` a node of `node`'s resources holds."""
    return min(
        math.floor(node.get(name, 0.0) / amount + EPSILON) for name, amount in per_worker.items()
    )


def describe(per_worker: Mapping[str, float]) -> str:
    """`{CPU: 1, accelerator_type:A100}`: the accelerator's sliver is shown by name only."""
    parts = [
        name if name.startswith(ACCELERATOR_PREFIX) else f"{name}: {amount:g}"
        for name, amount in per_worker.items()
    ]
    return "{" + ", ".join(parts) + "}"


def infeasible_reason(
    config: TrainConfig,
    nodes: Iterable[Mapping[str, float]],
    node_types: Iterable[Mapping[str, float]] = (),
) -> str | None:
    """Why no set of these nodes could ever hold the job's workers, or None when one can.
    `nodes`: each alive node's total resources; `node_types`: nodes an autoscaler can add (a
    job that fits one of them waits for it)."""
    per_worker = worker_resources(config)
    nodes = list(nodes)
    if sum(workers_fitting(node, per_worker) for node in nodes) >= config.num_workers:
        return None
    if any(workers_fitting(kind, per_worker) > 0 for kind in node_types):
        return None
    head = f"config.num_workers: {config.num_workers} workers of {describe(per_worker)}"
    for name in per_worker:
        if not any(node.get(name, 0.0) > 0 for node in nodes):
            what = name.replace(":", " ") if name.startswith(ACCELERATOR_PREFIX) else name
            return f"{head} cannot be placed: this cluster has no node with {what}"
    largest = {name: max(node.get(name, 0.0) for node in nodes) for name in per_worker if nodes}
    if not any(workers_fitting(node, per_worker) for node in nodes):
        return (
            f"{head} cannot be placed: no node holds one worker (the most any node has: "
            f"{', '.join(f'{name} {amount:g}' for name, amount in largest.items())})"
        )
    fitting = sum(workers_fitting(node, per_worker) for node in nodes)
    return f"{head} cannot be placed: this cluster's nodes hold {fitting} such workers at most"


def waiting_for(config: TrainConfig, available: Mapping[str, float]) -> str:
    """What the job waits for, against what is free in the cluster now:
    `2 workers of {CPU: 1}: 2 CPU; 0.4 free`."""
    per_worker = worker_resources(config)
    lacking = []
    for name, amount in per_worker.items():
        needed = amount * config.num_workers
        free = available.get(name, 0.0)
        if needed > free + EPSILON and not name.startswith(ACCELERATOR_PREFIX):
            lacking.append(f"{needed:g} {name}; {free:.3g} free")
        elif needed > free + EPSILON:
            lacking.append(f"a node with {name.replace(':', ' ')}")
    head = f"{config.num_workers} workers of {describe(per_worker)}"
    if not lacking:  # free in total, but not on few enough nodes
        return f"{head}: free in total, but not on nodes that hold them"
    return f"{head}: {'; '.join(lacking)}"
