"""Where a replica runs, as /models shows it: its node, the GPUs Ray gave it, and the device its
pipeline is on (a node without CUDA serves on the CPU: `device: auto`, deployments/loading.py)."""

from __future__ import annotations

import ray


def replica_placement(pipeline_device: str) -> dict:
    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        # The deployment's `num_gpus` (0.5: half a GPU; 0 on a CPU replica) and which GPUs Ray
        # gave it (CUDA_VISIBLE_DEVICES). On a node without CUDA these are logical and the
        # pipeline is on the CPU all the same.
        "gpu_share": context.get_assigned_resources().get("GPU", 0.0),
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
        "device": pipeline_device,
    }
