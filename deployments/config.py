"""Typed config of what runs in a model replica: one model (`ModelConfig`), where its LoRAs may
come from by URL (`RemoteLoraConfig`), and the node cache of an object-store LoRA root
(`LoraRootCacheConfig`). The app config (serve/config.py) holds these.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.family import FAMILY_NAMES, FamilyName
from deployments.outbound import AddressRules, UrlRules
from deployments.schemas import DefaultsOverride, GenerationDefaults


class CompileConfig(BaseModel):
    """Compiled generation: the denoiser's repeated blocks compiled once per replica, at start,
    with every request's adapters fused into its weights so that no switch recompiles
    (docs/configuration.md, "Compiled generation")."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Compile the denoiser's repeated blocks.")
    backend: Literal["inductor", "aot_eager", "eager"] = Field(
        default="inductor",
        description="torch.compile backend: inductor serves; aot_eager and eager trace and "
        "guard as inductor does without generating code (tests, debugging).",
    )
    mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        default="default",
        description="inductor's mode. No CUDA graphs: they capture weight addresses, which "
        "fusing each request's adapters changes.",
    )
    cache_dir: str | None = Field(
        default="~/.cache/loraplex/compile",
        max_length=2048,
        description="Node-local folder of compile artifacts, loaded at start and saved after "
        "a warm-up that missed; `~` is the replica's home. None keeps no artifacts.",
    )
    warmup: bool = Field(
        default=True,
        description="One render at the model's default size, in a few steps, before the "
        "replica is ready: the first request does not pay the compile.",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _no_cuda_graphs(cls, mode: object) -> object:
        if mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(
                f"compile.mode: {mode} is not allowed: its CUDA graphs capture weight "
                "addresses, which fusing each request's adapters changes; use default or "
                "max-autotune-no-cudagraphs"
            )
        return mode


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
    compile: CompileConfig = Field(
        default_factory=CompileConfig,
        description="Compiled generation of the denoiser (off by default).",
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
ADDRESS_FIELDS = set(AddressRules.model_fields)


class RemoteLoraConfig(AddressRules):
    """LoRAs given by URL (`loras: [{url: ...}]`): off unless enabled, and then only from the
    allowed schemes and hosts, and over http(s) only to the allowed ports and to public
    addresses (AddressRules, deployments/outbound.py), up to a size and a time limit. The same
    rules hold for training's `image_urls`. Fetched files sit in a node-local disk cache keyed
    by the URL's sha256, trimmed least-recently-used to a byte budget."""

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

    @property
    def url_rules(self) -> UrlRules:
        """What a URL may be under this config, as deployments/outbound.py checks it."""
        return UrlRules(
            allowed_hosts=self.allowed_hosts,
            allowed_schemes=self.allowed_schemes,
            **self.model_dump(include=ADDRESS_FIELDS),
        )


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
