"""Validate a training job, run it as a Ray Train TorchTrainer, publish the adapter.

`run(job)` works in any process connected to Ray (it starts a local Ray if none is running):
the CLI (`python -m cluster.train`), a Ray job submitted by `loraplex train` or `POST /train`,
or a test."""

from __future__ import annotations

import importlib.util
import logging
import os
import posixpath
import tempfile

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.train import progress
from cluster.train.config import CHECKPOINTS_FOLDER, JOB_FILE, RunStatus, TrainJob
from cluster.train.data import DatasetSummary, check_dataset
from cluster.train.loop import ADAPTER_FILE, loop_config_for, train_loop
from cluster.train.publish import publish
from deployments.family import get_family
from serve.errors import InvalidRequest

logger = logging.getLogger(__name__)

# Optimizers whose package is optional: refused before the job starts where it is missing.
OPTIONAL_OPTIMIZERS = {"adamw8bit": "bitsandbytes", "lion": "lion_pytorch"}


def run_name_for(job: TrainJob) -> str:
    """The run's folder under storage_path: `run_name`, else the output file's stem."""
    if job.run_name:
        return job.run_name
    return job.output_file.removesuffix(".safetensors").replace("/", "-")


def run_dir_for(job: TrainJob) -> str:
    return posixpath.join(_absolute(job.storage_path), run_name_for(job))


def check_job(job: TrainJob) -> DatasetSummary:
    """Everything that can be refused before a worker starts, with the field named:
    InvalidRequest for a family that cannot be trained, an option it lacks, a missing optimizer
    package, an empty dataset or an unreadable image. Returns the dataset's summary."""
    family = get_family(job.base_model)
    if family.training is None:
        raise InvalidRequest(f"base_model: training is not supported for {family.name} yet")
    config = job.config
    if config.train_text_encoder and not family.text_encoder_components:
        raise InvalidRequest(
            f"config.train_text_encoder: {family.name} LoRAs do not adapt the text encoder"
        )
    package = OPTIONAL_OPTIMIZERS.get(config.optimizer)
    if package and importlib.util.find_spec(package) is None:
        raise InvalidRequest(
            f"config.optimizer: {config.optimizer} needs the {package} package, which is not "
            "installed; use adamw or adafactor"
        )
    if config.use_gpu is False and config.mixed_precision == "fp16":
        raise InvalidRequest("config.mixed_precision: fp16 needs use_gpu; use bf16 or no on CPU")
    if config.sample_every and not config.sample_prompts:
        raise InvalidRequest("config.sample_every: set sample_prompts too")
    summary = check_dataset(job)
    if config.lr_warmup_steps >= summary.total_steps:
        raise InvalidRequest(
            f"config.lr_warmup_steps: {config.lr_warmup_steps} is not below the "
            f"{summary.total_steps} training steps"
        )
    return summary


def make_trainer(job: TrainJob, summary: DatasetSummary) -> TorchTrainer:
    config = job.config
    run_dir = run_dir_for(job)
    scaling = ScalingConfig(
        num_workers=config.num_workers,
        use_gpu=config.use_gpu,
        accelerator_type=config.accelerator_type,
        resources_per_worker=None if config.use_gpu else {"CPU": 1},
    )
    # Ray keeps the run's checkpoints in `<run_dir>/checkpoints/checkpoint_*`, the layout the
    # API reads (see config.py).
    run_config = RunConfig(
        name=CHECKPOINTS_FOLDER,
        storage_path=run_dir,
        checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        failure_config=FailureConfig(max_failures=config.max_failures),
    )
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config_for(job, summary.total_steps, run_dir, summary.dataset_hash),
        scaling_config=scaling,
        run_config=run_config,
    )


def run(job: TrainJob, summary: DatasetSummary | None = None) -> RunStatus:
    """Train, publish and return the final status (also written to status.json). Refuses a bad
    job with InvalidRequest before anything starts; a failed run returns state FAILED."""
    job = job.model_copy(
        update={
            "storage_path": _absolute(job.storage_path),
            "lora_root": _absolute(job.lora_root),
            "dataset_root": _absolute(job.dataset_root),
        }
    )
    if job.dataset and "://" not in job.dataset and job.dataset.startswith("."):
        job = job.model_copy(update={"dataset": os.path.abspath(job.dataset)})
    summary = summary or check_job(job)
    run_dir = run_dir_for(job)
    progress.write_file(posixpath.join(run_dir, JOB_FILE), job.model_dump_json(indent=2).encode())
    progress.write_status(run_dir, RunStatus(state="RUNNING", total_steps=summary.total_steps))
    if not ray.is_initialized():
        ray.init()
    try:
        result = make_trainer(job, summary).fit()
        error = result.error
    except Exception as e:  # Ray raises once the failures allowed are spent
        result, error = None, e
    status = progress.read_status(run_dir) or RunStatus(total_steps=summary.total_steps)
    status.checkpoints = progress.list_checkpoints(run_dir)
    if error is not None or result is None or result.checkpoint is None:
        status.state = "FAILED"
        status.error = f"{type(error).__name__}: {error}" if error else "no checkpoint"
        progress.write_status(run_dir, status)
        return status
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, ADAPTER_FILE), "rb") as file:
            adapter = file.read()
    refs = publish(job, adapter)
    status.state = "SUCCEEDED"
    status.output_lora = refs[0].name
    status.eta_s = 0.0
    progress.write_status(run_dir, status)
    logger.info("published %s", ", ".join(ref.name for ref in refs))
    return status


def _absolute(location: str) -> str:
    """A local path made absolute (Ray Train needs it; workers may run elsewhere), URIs as is."""
    if "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location or tempfile.gettempdir()))
