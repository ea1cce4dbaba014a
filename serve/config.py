"""Typed application config: the `args` of the Ray Serve config file (cluster/*.yaml).

Replica counts, autoscaling and `ray_actor_options` (the GPU share) are not here: they sit in the
Serve file's own `deployments:` section, so Ray's tools keep working on it.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.config import LoraRootCacheConfig, ModelConfig, RemoteLoraConfig
from serve.auth import ApiKey, PlainKey
from serve.queue.config import QueueConfig


class BackPressureConfig(BaseModel):
    """How much the service takes on before it answers 503 `overloaded` with Retry-After,
    rather than letting requests wait without bound (docs/api.md, Limits)."""

    model_config = ConfigDict(extra="forbid")

    ingress_max_ongoing_requests: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Requests each ingress replica works on at once, those waiting in a "
        "model's queue included; one more is answered 503 at once.",
    )
    ingress_max_queued_requests: int = Field(
        default=512,
        ge=0,
        le=10_000,
        description="Requests Serve's proxy holds for a busy ingress replica (the ingress's "
        "Serve max_queued_requests); past it the proxy answers 503 itself.",
    )
    model_max_queued_requests: int = Field(
        default=64,
        ge=0,
        le=10_000,
        description="Each model deployment's max_queued_requests (per ingress replica) unless "
        "the Serve config's deployments: section sets it; past it 503.",
    )


class AppConfig(BaseModel):
    """The whole application: every served model plus what they share."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(min_length=1, max_length=32)
    lora_root: str = Field(
        default="./models/loras",
        max_length=2048,
        description="fsspec URI or local folder holding the .safetensors adapters.",
    )
    dataset_root: str = Field(
        default="./models/datasets",
        max_length=2048,
        description="fsspec URI or local folder holding training datasets (PUT /datasets/{name}).",
    )
    train_storage_path: str = Field(
        default="./models/train",
        max_length=2048,
        description="fsspec URI or local folder for training runs: status, loss curve, samples, "
        "checkpoints. Every node running a training job must reach it.",
    )
    job_submission_url: str = Field(
        default="auto",
        max_length=2048,
        description="Ray job submission server (the dashboard, e.g. http://127.0.0.1:8265) that "
        "POST /train submits to; auto: the dashboard of the cluster the ingress runs on.",
    )
    training_node_types: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        max_length=64,
        description="Node types an autoscaler can add (name -> resources, as ray-cluster.yaml's "
        "available_node_types declare them): a training job that no node of the cluster holds "
        "but one of these would is accepted and waits for it, instead of a 422.",
    )
    api_keys: list[PlainKey | ApiKey] = Field(
        default_factory=list,
        max_length=1024,
        description="When set, every route but /healthz and /docs needs `Authorization: Bearer "
        "<key>` or `X-API-Key: <key>`. A plain string has every scope and no tenant; "
        "`{key or key_env, scopes, tenant}` limits a key (docs/api.md, API keys).",
    )
    allow_anonymous: bool = Field(
        default=False,
        description="Serve without api_keys although Serve's http_options.host is not a "
        "loopback address (0.0.0.0); without it such an app refuses to start.",
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request body."
    )
    back_pressure: BackPressureConfig = Field(
        default_factory=BackPressureConfig,
        description="Queue bounds: a full service answers 503 overloaded with Retry-After.",
    )
    max_lora_bytes: int = Field(
        default=2 * 1024**3,
        ge=1024,
        le=64 * 1024**3,
        description="Largest LoRA file accepted by upload or merge. A plain PUT is also bound "
        "by max_body_bytes; larger files use the resumable upload, one chunk per request.",
    )
    upload_expiry_s: int = Field(
        default=24 * 3600,
        ge=60,
        le=30 * 24 * 3600,
        description="A resumable upload not completed this long after it began is removed.",
    )
    lora_resolve_cache_s: float = Field(
        default=0.0,
        ge=0.0,
        le=3600.0,
        description="How long a generation request may use a LoRA name's version resolved by an "
        "earlier request, instead of asking lora_root (on an object store, one HEAD request per "
        "LoRA per request). A file overwritten in place elsewhere is served at its old version "
        "for up to this long; a new file is found at once. 0: every request asks.",
    )
    remote_loras: RemoteLoraConfig = Field(
        default_factory=RemoteLoraConfig,
        description="LoRAs by URL: off by default; an allowlist, a size limit and a disk cache.",
    )
    lora_root_cache: LoraRootCacheConfig = Field(
        default_factory=LoraRootCacheConfig,
        description="A node-local disk cache of lora_root's files (on for object stores).",
    )
    queue: QueueConfig = Field(
        default_factory=QueueConfig,
        description="The queue API (POST /queue/<endpoint>): its root, bounds, result "
        "retention and webhooks (docs/api.md, Queue).",
    )

    @field_validator("lora_root", "dataset_root", "train_storage_path")
    @classmethod
    def _absolute_local_root(cls, root: str) -> str:
        # Replicas may run with another working directory: pin relative local paths now.
        if "://" in root:
            return root
        return os.path.abspath(root)

    @model_validator(mode="after")
    def _separate_cache_folders(self) -> AppConfig:
        # Each cache trims the whole folder to its own budget: one folder would make them
        # evict each other's files.
        folders = (self.remote_loras.cache_dir, self.lora_root_cache.cache_dir)
        if len({os.path.abspath(os.path.expanduser(folder)) for folder in folders}) == 1:
            raise ValueError(
                "lora_root_cache.cache_dir: must not be remote_loras.cache_dir "
                f"({self.remote_loras.cache_dir})"
            )
        return self

    @model_validator(mode="after")
    def _unique_names_and_endpoints(self) -> AppConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: deployment names must be unique, got {names}")
        endpoints = [m.endpoint for m in self.models]
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"models: endpoints must be unique, got {endpoints}")
        return self

    def model_for_endpoint(self, path: str) -> tuple[ModelConfig, bool] | None:
        """(model, lora_required) for an HTTP path like `flux-lora`, or None."""
        for model in self.models:
            if path == model.endpoint:
                return model, False
            if path == f"{model.endpoint}-lora":
                return model, True
        return None
