"""The training job's typed config: what `POST /train`, `loraplex train --config job.yaml` and
`python -m cluster.train --config job.yaml` all take, validated before any worker starts.

Where a run keeps its files (the contract between the job and the HTTP API that reads them):

    <storage_path>/<run_name>/
        job.json            this config, as the job was started
        status.json         RunStatus, rewritten by rank 0 as training goes
        loss.png            the loss curve so far
        samples/            step-<step:06d>-<index>.png for each sample prompt
        checkpoints/        Ray Train checkpoints (the last `keep_checkpoints`)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.errors import LoraNotFound
from deployments.family import FAMILY_NAMES, FamilyName
from deployments.loras.store import LORA_SUFFIX, check_name
from deployments.outbound import UrlRules

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
STATUS_FILE = "status.json"
JOB_FILE = "job.json"
LOSS_CURVE_FILE = "loss.png"
SAMPLES_FOLDER = "samples"
CHECKPOINTS_FOLDER = "checkpoints"

LrScheduler = Literal["constant", "cosine", "linear", "cosine_with_restarts"]
Optimizer = Literal["adamw", "adafactor", "adamw8bit", "lion"]
MixedPrecision = Literal["no", "fp16", "bf16"]
# The GCS address of the cluster a job was submitted to, set by the API in the job's
# environment; the job's driver connects there (cluster/train/run.py).
CLUSTER_ADDRESS_ENV = "LORAPLEX_RAY_ADDRESS"
RunState = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"]


class TrainConfig(BaseModel):
    """Hyperparameters, with the training guide's defaults."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=16, ge=1, le=256, description="LoRA rank.")
    alpha: float = Field(default=16.0, gt=0, le=1024, description="LoRA alpha; scale alpha/rank.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0, le=100_000)
    lr_num_cycles: int = Field(default=1, ge=1, le=100, description="cosine_with_restarts only.")
    max_train_steps: int | None = Field(
        default=None, ge=1, le=1_000_000, description="None: 100 x the number of images."
    )
    resolution: int = Field(default=1024, ge=64, le=4096, description="Pixels, square budget.")
    aspect_ratio_buckets: bool = Field(
        default=True, description="Group images by aspect ratio instead of center-cropping all."
    )
    batch_size: int = Field(default=1, ge=1, le=256, description="Per worker.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    optimizer: Optimizer = "adamw"
    weight_decay: float = Field(default=1e-2, ge=0, le=1.0)
    max_grad_norm: float = Field(default=1.0, ge=0, le=1000, description="0: no clipping.")
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    train_text_encoder: bool = False
    cache_latents: bool = Field(
        default=False, description="Encode each image once; its latents stay in memory."
    )
    cache_text_embeddings: bool = Field(
        default=True,
        description="Encode each caption once (off: every step, less memory). Not with "
        "train_text_encoder, whose embeddings change as it trains.",
    )
    caption_dropout: float = Field(default=0.0, ge=0, le=1.0)
    noise_offset: float = Field(default=0.0, ge=0, le=1.0)
    repeats: int = Field(default=1, ge=1, le=1000, description="Times each image is seen/epoch.")
    save_every: int = Field(default=100, ge=1, le=1_000_000, description="Steps per checkpoint.")
    keep_checkpoints: int = Field(default=2, ge=1, le=100)
    sample_every: int | None = Field(default=None, ge=1, le=1_000_000)
    sample_prompts: list[str] = Field(default_factory=list, max_length=16)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    num_workers: int = Field(default=1, ge=1, le=512)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(
        default=None,
        ge=0,
        le=512,
        description="Logical CPUs per worker; None: 1, or 0 with use_gpu (Ray Train's "
        "defaults). Below 1 lets a job run beside `make serve` on a small machine.",
    )
    gpus_per_worker: float = Field(default=1.0, gt=0, le=16, description="With use_gpu.")
    accelerator_type: str | None = Field(
        default=None,
        max_length=32,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description='e.g. "A100": workers go only to nodes declaring the resource '
        '"accelerator_type:A100".',
    )
    start_timeout_s: float = Field(
        default=600.0,
        ge=1,
        le=7 * 86400,
        description="How long a job waits for its workers' resources before it fails.",
    )
    max_failures: int = Field(default=2, ge=0, le=100, description="Worker failures tolerated.")
    export_kohya: bool = Field(
        default=False, description="Also write <output>.kohya.safetensors for ComfyUI/A1111."
    )
    overwrite: bool = Field(
        default=False,
        description="Replace an adapter of the output's name. Off: a job whose output exists is "
        "refused at submit, and fails rather than replace one published while it trained.",
    )

    @model_validator(mode="after")
    def _check_workers(self) -> TrainConfig:
        if self.worker_cpus == 0 and not self.use_gpu:
            raise ValueError("cpus_per_worker: 0 needs use_gpu (a worker needs a CPU or a GPU)")
        return self

    @property
    def worker_cpus(self) -> float:
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        return 0.0 if self.use_gpu else 1.0


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=4096)
    caption: str = Field(default="", max_length=4000)


class TrainJob(BaseModel):
    """One training run: which model, which images, where the adapter goes."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    base_model: FamilyName = Field(
        description=f"The family to train: one of {', '.join(FAMILY_NAMES)}."
    )
    model_uri: str = Field(
        default="", max_length=2048, description="Empty: tiny://<family>, as in the Serve config."
    )
    dataset: str | None = Field(
        default=None,
        max_length=2048,
        description="A folder of images with same-named .txt captions: a name under "
        "dataset_root, or a path / fsspec URI.",
    )
    image_urls: list[ImageUrl] = Field(default_factory=list, max_length=10_000)
    trigger_word: str = Field(default="", max_length=200)
    character_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,128}$")
    output_name: str | None = Field(
        default=None, min_length=1, max_length=512, description="A name under the LoRA root."
    )
    run_name: str | None = Field(
        default=None, pattern=RUN_NAME_PATTERN, description="Default: derived from the output."
    )
    lora_root: str = Field(default="./models/loras", max_length=2048)
    dataset_root: str = Field(default="./models/datasets", max_length=2048)
    storage_path: str = Field(
        default="./models/train", max_length=2048, description="Runs, checkpoints, status."
    )
    config: TrainConfig = Field(default_factory=TrainConfig)
    url_rules: UrlRules = Field(
        default_factory=UrlRules,
        description="Where image_urls may point (deployments/outbound.py): by default any host "
        "over http(s), on ports 80 and 443, at public addresses only. POST /train sets it from "
        "the server's remote_loras.",
    )

    @field_validator("output_name")
    @classmethod
    def _name_in_lora_root(cls, name: str | None) -> str | None:
        # Checked here, not when the trained adapter is published: a name the store refuses
        # would otherwise fail only after the whole run.
        if name is not None:
            try:
                check_name(output_file_for(name))
            except LoraNotFound as e:
                reason = e.message.partition(" (")[2].rstrip(")") or "not a file name"
                raise ValueError(f"{name!r} is not a name under the LoRA root ({reason})") from e
        return name

    @model_validator(mode="after")
    def _check(self) -> TrainJob:
        if (self.dataset is None) == (not self.image_urls):
            raise ValueError("dataset or image_urls: give exactly one")
        if (self.character_id is None) == (self.output_name is None):
            raise ValueError("character_id or output_name: give exactly one")
        if not self.model_uri:
            self.model_uri = f"tiny://{self.base_model}"
        return self

    @property
    def output_file(self) -> str:
        """The file name the adapter is published under, relative to the LoRA root."""
        if self.character_id is not None:
            return f"character-{self.character_id}.safetensors"
        return output_file_for(str(self.output_name))


def output_file_for(output_name: str) -> str:
    return output_name if output_name.endswith(LORA_SUFFIX) else f"{output_name}{LORA_SUFFIX}"


class RunStatus(BaseModel):
    """What rank 0 writes to status.json and `GET /train/{job_id}` returns (with Ray's state)."""

    model_config = ConfigDict(extra="forbid")

    state: RunState = "PENDING"
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    steps_per_s: float | None = None
    eta_s: float | None = None
    checkpoints: list[str] = Field(default_factory=list)
    samples: list[str] = Field(default_factory=list, description="Files under samples/.")
    output_lora: str | None = Field(default=None, description="Set once published.")
    error: str | None = None
    initial_validation_loss: float | None = Field(
        default=None, description="Loss on a fixed batch (fixed noise and timesteps) at step 0."
    )
    validation_loss: float | None = Field(
        default=None, description="The same fixed-batch loss at the end of training."
    )
    peak_rss_mb: list[float] = Field(
        default_factory=list, description="Peak resident memory of each worker, MiB."
    )
    workers: int | None = None
    waiting_for: str | None = Field(
        default=None, description="While PENDING: the resources the workers wait for."
    )
