"""What the routes share: the ingress replica's handles, stores and config, built once per
replica, and the FastAPI dependency that hands them to a route.

The routes are plain functions in APIRouters, not methods of the ingress class, so they reach the
replica's state the way Serve's own class-based routes reach `self`: through the replica context.
(`@serve.ingress` serves a pickled copy of the FastAPI app, so state set on the module's `app`
in the constructor is not reliably the state a request sees.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.loras.store import LoraStore
from serve.config import AppConfig
from serve.datasets import Datasets
from serve.loras.catalog import Catalog
from serve.loras.uploads import Uploads
from serve.queue.store import QueueStore
from serve.registry import RegistryClient
from serve.training import TrainingJobs

# What a handle call raises when its replica is gone: the replica died or its node did
# (ActorDiedError) or it cannot be reached (ActorUnavailableError), both RayActorError, or Serve
# has no replica to give. Serve retries a request the replica had not yet accepted; one it had
# accepted fails with these. The ingress answers them as 503 `replica_unavailable`.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


@dataclass(frozen=True)
class Services:
    config: AppConfig
    handles: dict[str, DeploymentHandle]
    """One per configured model, by deployment name."""
    store: LoraStore
    catalog: Catalog
    uploads: Uploads
    registry: RegistryClient
    """The app's replica registry: hot adapters per replica."""
    datasets: Datasets
    training: TrainingJobs
    queue: QueueStore
    """Queued requests (POST /queue/<endpoint>), run by serve/queue/worker.py."""
    queue_submitted: asyncio.Event
    """Set on each submit, so this replica's queue worker looks at once."""

    @classmethod
    def build(cls, config: AppConfig, handles: dict[str, DeploymentHandle]) -> Services:
        store = LoraStore(config.lora_root)
        return cls(
            config=config,
            handles=handles,
            store=store,
            catalog=Catalog(store),
            uploads=Uploads(store, config.max_lora_bytes, config.upload_expiry_s),
            registry=RegistryClient(serve.get_replica_context().app_name),
            datasets=Datasets(config.dataset_root),
            training=TrainingJobs(config),
            queue=QueueStore(config.queue.root, serve.get_replica_context().app_name),
            queue_submitted=asyncio.Event(),
        )


async def current_services() -> Services:
    """This replica's Services (the ingress keeps them as `services`). Async: FastAPI would run
    a plain function in its thread pool, a thread hop on every request."""
    return serve.get_replica_context().servable_object.services


ServicesDep = Annotated[Services, Depends(current_services)]


def replica_error(error: Exception) -> Exception:
    """The error a replica raised. It arrives as Ray's RayTaskError subclass of the same type;
    `cause` is the original, whose str() is the message without Ray's traceback."""
    return getattr(error, "cause", None) or error
