"""Validate a training job, run it as a Ray Train TorchTrainer, publish the adapter.

`run(job)` works in any process connected to Ray (it starts a local Ray if none is running):
the CLI (`python -m cluster.train`), a Ray job submitted by `loraplex train` or `POST /train`,
or a test."""

from __future__ import annotations

import logging
import os
import posixpath
import time

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.placement_group import placement_group, remove_placement_group

from cluster.train import progress
from cluster.train.capacity import infeasible_reason, waiting_for, worker_resources
from cluster.train.checks import check_job
from cluster.train.config import (
    CHECKPOINTS_FOLDER,
    CLUSTER_ADDRESS_ENV,
    JOB_FILE,
    RunStatus,
    TrainJob,
)
from cluster.train.data import DatasetSummary
from cluster.train.loop import ADAPTER_FILE, train_loop
from cluster.train.loop_config import loop_config_for
from cluster.train.progress import absolute_location, run_dir_for
from cluster.train.publish import publish
from deployments.errors import Conflict

logger = logging.getLogger(__name__)

WAIT_POLL_S = 2.0  # how often a pending job rewrites what it waits for


def make_trainer(job: TrainJob, summary: DatasetSummary) -> TorchTrainer:
    config = job.config
    run_dir = run_dir_for(job)
    scaling = ScalingConfig(
        num_workers=config.num_workers,
        use_gpu=config.use_gpu,
        accelerator_type=config.accelerator_type,
        resources_per_worker=worker_resources(config),
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
            "storage_path": absolute_location(job.storage_path),
            "lora_root": absolute_location(job.lora_root),
            "dataset_root": absolute_location(job.dataset_root),
        }
    )
    if job.dataset and "://" not in job.dataset and job.dataset.startswith("."):
        job = job.model_copy(update={"dataset": os.path.abspath(job.dataset)})
    summary = summary or check_job(job)
    run_dir = run_dir_for(job)
    progress.write_file(posixpath.join(run_dir, JOB_FILE), job.model_dump_json(indent=2).encode())
    if not ray.is_initialized():
        address = os.environ.get(CLUSTER_ADDRESS_ENV)
        if address:  # as RAY_ADDRESS too, for Ray Train's helper actors that query the state API
            os.environ["RAY_ADDRESS"] = address
        ray.init(address=address)
    refused = wait_for_workers(job, run_dir, summary.total_steps)
    if refused is not None:
        status = RunStatus(state="FAILED", total_steps=summary.total_steps, error=refused)
        progress.write_status(run_dir, status)
        return status
    progress.write_status(run_dir, RunStatus(state="RUNNING", total_steps=summary.total_steps))
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
    return finish(
        job, run_dir, status, adapter, posixpath.join(result.checkpoint.path, ADAPTER_FILE)
    )


def finish(
    job: TrainJob, run_dir: str, status: RunStatus, adapter: bytes, kept_at: str
) -> RunStatus:
    """Publish the trained adapter and write the final status: SUCCEEDED, or FAILED with the
    reason when its name was taken while it trained and the job may not replace it."""
    try:
        refs = publish(job, adapter)
    except Conflict as e:
        status.state = "FAILED"
        status.error = f"{e.message}. Not published; the trained adapter is kept at {kept_at}"
        progress.write_status(run_dir, status)
        return status
    status.state = "SUCCEEDED"
    status.output_lora = refs[0].name
    status.eta_s = 0.0
    progress.write_status(run_dir, status)
    logger.info("published %s", ", ".join(ref.name for ref in refs))
    return status


def wait_for_workers(job: TrainJob, run_dir: str, total_steps: int) -> str | None:
    """Wait until the cluster has room for every worker, writing PENDING and what the job waits
    for into status.json; the reason it gave up after `config.start_timeout_s`, or None.

    Room is asked of Ray's scheduler itself: a placement group of the workers' bundles, packed
    as Ray Train packs them, removed once placed so the trainer's own takes its place."""
    config = job.config
    bundles = [worker_resources(config)] * config.num_workers
    group = placement_group(bundles, strategy="PACK")
    placed = group.ready()
    deadline = time.monotonic() + config.start_timeout_s
    try:
        while True:
            ready, _ = ray.wait([placed], timeout=WAIT_POLL_S)
            if ready:
                return None
            waiting = waiting_for(config, ray.available_resources())
            alive = [node["Resources"] for node in ray.nodes() if node["Alive"]]
            lost = infeasible_reason(config, alive)
            if lost is not None:  # nodes left since the job was accepted
                waiting = f"{waiting} ({lost.split(': ', 1)[1]})"
            if time.monotonic() > deadline:
                return (
                    f"config.start_timeout_s: the workers waited {config.start_timeout_s:g} s "
                    f"for {waiting}"
                )
            pending = RunStatus(state="PENDING", total_steps=total_steps, waiting_for=waiting)
            progress.write_status(run_dir, pending)
    finally:
        remove_placement_group(group)
