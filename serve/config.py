"""Typed application config: the `args` of the Ray Serve config file (cluster/*.yaml).

Replica counts, autoscaling and `ray_actor_options` (the GPU share) are not here: they sit in the
Serve file's own `deployments:` section, so Ray's tools keep working on it.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.family import FAMILY_NAMES, FamilyName
from serve.schemas import DefaultsOverride, GenerationDefaults


class ModelConfig(BaseModel):
    """One base model: one Serve deployment, named `name`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="Serve deployment name; the `deployments:` section refers to it.",
    )
    family: FamilyName = Field(description=f"Model family, one of {', '.join(FAMILY_NAMES)}.")
    model_uri: str = Field(
        default="",
        max_length=2048,
        description="tiny://<family>, a local diffusers directory, an fsspec URI or a hub id. "
        "Empty means tiny://<family>.",
    )
    endpoint: str = Field(
        default="",
        pattern=r"^([a-z0-9][a-z0-9._-]{0,62})?$",
        description="HTTP path served: /<endpoint> (LoRA optional) and /<endpoint>-lora "
        "(LoRA required). Empty means the family's own (flux, qwen-image-2512, ...).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: cuda when the replica has a GPU, else cpu."
    )
    max_adapters_per_replica: int = Field(
        default=8, ge=1, le=1024, description="Hot LoRA adapters kept per replica (LRU)."
    )
    fuse_single_adapter: bool = Field(
        default=False,
        description="When a request uses one adapter, add it into the denoiser's weights for "
        "the generation (plain matmuls, no LoRA overhead), keeping the base weights aside: "
        "faster, at the memory of one copy of the adapted layers. Its images differ from the "
        "unfused ones in the last bits.",
    )
    max_batch_size: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Requests rendered together in one pipeline call when they differ only in "
        "prompt and seed (same adapter stack, size, steps, guidance). 1: off, every request "
        "its own call, bitwise reproducible. Above 1, a batched image may differ from the "
        "unbatched one at its seed by a couple of 1/255 steps in some pixels (matmul blocking "
        "depends on the batch size). Keep the deployment's max_ongoing_requests at least this.",
    )
    batch_wait_timeout_ms: float = Field(
        default=10.0,
        ge=0.0,
        le=5000.0,
        description="With max_batch_size above 1: how long the first request of a batch waits "
        "for others to join it.",
    )
    price_per_gpu_hour: float = Field(
        default=0.0, ge=0.0, le=1000.0, description="USD per GPU-hour, for X-Cost-USD."
    )
    defaults: DefaultsOverride = Field(
        default_factory=DefaultsOverride,
        description="Overrides of the family's production defaults (width, height, steps, cfg).",
    )

    @model_validator(mode="after")
    def _fill_family_defaults(self) -> ModelConfig:
        from deployments.family import get_family

        family = get_family(self.family)
        if not self.model_uri:
            self.model_uri = f"tiny://{self.family}"
        if not self.endpoint:
            self.endpoint = family.endpoint
        return self

    def generation_defaults(self) -> GenerationDefaults:
        """The family's production defaults with this config's overrides applied."""
        from deployments.family import get_family

        base = get_family(self.family).defaults
        return base.model_copy(update=self.defaults.model_dump(exclude_none=True))


DEFAULT_LORA_CACHE_DIR = "~/.cache/loraplex/loras"


class RemoteLoraConfig(BaseModel):
    """LoRAs given by URL (`loras: [{url: ...}]`): off unless enabled, and then only from the
    allowed schemes and hosts, up to a size and a time limit. Fetched files sit in a node-local
    disk cache keyed by the URL's sha256, trimmed least-recently-used to a byte budget."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Accept `url` LoRA sources at all.")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Exact host names (no wildcards, no port) a URL may name; required when "
        "enabled. For s3://bucket/key and the like, the host is the bucket.",
    )
    allowed_schemes: list[str] = Field(
        default_factory=lambda: ["https"],
        min_length=1,
        max_length=16,
        description="URL schemes accepted: https by default; http, s3, gs, hf, memory and other "
        "fsspec protocols may be added. file and local are never accepted: the LoRA root is the "
        "only local source.",
    )
    max_file_bytes: int = Field(
        default=2 * 1024**3,
        ge=1024,
        le=64 * 1024**3,
        description="Largest file fetched; a bigger one is refused as it streams in.",
    )
    timeout_s: float = Field(
        default=60.0, gt=0.0, le=3600.0, description="Time allowed for one whole download."
    )
    cache_dir: str = Field(
        default=DEFAULT_LORA_CACHE_DIR,
        min_length=1,
        max_length=2048,
        description="Node-local folder for fetched files, shared by the replicas of a node; "
        "`~` is the replica's home.",
    )
    cache_budget_bytes: int = Field(
        default=20 * 1024**3,
        ge=1024,
        le=100 * 1024**4,
        description="Bytes the cache may hold; least-recently-used files go beyond it.",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _plain_hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not host or host != host.strip() or any(c in host for c in "/:@*?#"):
                raise ValueError(f"allowed_hosts: {host!r} is not a plain host name")
        return [host.lower() for host in hosts]

    @field_validator("allowed_schemes")
    @classmethod
    def _no_local_schemes(cls, schemes: list[str]) -> list[str]:
        schemes = [scheme.lower() for scheme in schemes]
        for scheme in schemes:
            if scheme in ("file", "local") or not scheme.isascii() or not scheme.isalnum():
                raise ValueError(f"allowed_schemes: {scheme!r} is not allowed")
        return schemes

    @model_validator(mode="after")
    def _hosts_when_enabled(self) -> RemoteLoraConfig:
        if self.enabled and not self.allowed_hosts:
            raise ValueError("allowed_hosts: required when remote LoRAs are enabled")
        return self


DEFAULT_ROOT_CACHE_DIR = "~/.cache/loraplex/lora-root"


class LoraRootCacheConfig(BaseModel):
    """A node-local disk cache of the files replicas read from `lora_root`, keyed by each file's
    version: an adapter evicted from a replica and asked for again is read from the node's
    disk, not fetched from the object store again. Shared by the replicas of a node, trimmed
    least-recently-used to a byte budget."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="auto: when lora_root is not a local folder (s3://, gs://, any other fsspec "
        "protocol); always: also for a local folder, such as an NFS or EFS mount whose reads "
        "cross the network; never: every load reads lora_root.",
    )
    cache_dir: str = Field(
        default=DEFAULT_ROOT_CACHE_DIR,
        min_length=1,
        max_length=2048,
        description="Node-local folder for the copies, shared by the replicas of a node (fast "
        "local disk: NVMe); `~` is the replica's home. Not remote_loras.cache_dir.",
    )
    cache_budget_bytes: int = Field(
        default=50 * 1024**3,
        ge=1024,
        le=100 * 1024**4,
        description="Bytes the cache may hold; least-recently-used files go beyond it. A file "
        "larger than the whole budget is read from lora_root each time.",
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
    api_keys: list[str] = Field(
        default_factory=list,
        max_length=1024,
        description="When set, every route but /healthz and /docs needs `Authorization: Bearer "
        "<key>` or `X-API-Key: <key>`.",
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request body."
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
