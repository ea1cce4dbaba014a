"""LoRA adapter files, shared by the replicas, the ingress and the training job: the store (an
fsspec root), reading and describing files, remote sources, node caches, and the merge."""

from deployments.loras.store import LoraStore
from deployments.schemas import LoraRef

__all__ = ["LoraRef", "LoraStore"]
