"""Training runs as Ray jobs: submission, status, logs, run files and stopping.

A training run is a Ray job (`python -m cluster.train --config <run>/job.json`) submitted through
Ray's job submission server, so `ray job list` / `ray job logs` see it too. Its state is Ray's
(PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); its progress is the `status.json` that rank 0
rewrites in the run folder `<train_storage_path>/<job_id>/` (layout in cluster/train/config.py).
What a job may be is checked before it gets here (serve/train_request.py).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cluster.train.config import (
    CLUSTER_ADDRESS_ENV,
    JOB_FILE,
    LOSS_CURVE_FILE,
    SAMPLES_FOLDER,
    STATUS_FILE,
    RunStatus,
    TrainJob,
)
from deployments.errors import InvalidRequest, JobServerUnavailable, NotFound
from deployments.storage import shared_root
from serve.config import AppConfig

JOB_ID = re.compile(r"^train-[0-9a-f]{32}$")
SAMPLE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.png$")
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
# Passed to the job as they are here: offline hub, reproducible CPU matmuls, quiet tokenizers.
JOB_ENV_VARS = ("HF_HUB_OFFLINE", "MKL_CBWR", "TOKENIZERS_PARALLELISM")
STOP_WAIT_S = 30.0


def new_job_id() -> str:
    return f"train-{uuid.uuid4().hex}"


class TrainingJobs:
    """Ray jobs running `cluster.train`, and the run folders they write."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.fs, root = shared_root(config.train_storage_path)
        self.storage_root = root.rstrip("/") or "/"
        self._client = None
        self._gcs_address: str | None = None

    @property
    def client(self):
        """The job submission client, made on first use (the dashboard may start late)."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            address = self.config.job_submission_url
            if address == "auto":
                import ray

                # The GCS knows where this cluster's dashboard (the job server) listens.
                address = self._gcs_address = ray.get_runtime_context().gcs_address
            from ray.exceptions import AuthenticationError

            try:
                self._client = JobSubmissionClient(address)
            except AuthenticationError as e:
                raise JobServerUnavailable(
                    f"the Ray job server at {address} refused this node's Ray token; under "
                    "RAY_AUTH_MODE=token every node needs the cluster's token (docs/cluster.md)"
                ) from e
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise JobServerUnavailable(
                    f"the Ray job server at {address} is not reachable ({e}); training needs "
                    "the Ray dashboard (ray start --head --include-dashboard=true)"
                ) from e
        return self._client

    # Submission

    def submit(self, job_id: str, job: TrainJob, tenant: str | None = None) -> dict:
        """Write the job file into the run folder and submit the run as a Ray job, owned by
        `tenant` (None: by no tenant, which only keys without a tenant see)."""
        run = self._run_path(job_id)
        self.fs.makedirs(run, exist_ok=True)
        job_json = job.model_dump_json(indent=2)
        job_path = posixpath.join(run, JOB_FILE)
        self.fs.pipe_file(job_path, job_json.encode())
        client = self.client  # first: it learns the GCS address the runtime env passes on
        runtime_env = job_runtime_env(self._gcs_address)
        python = shlex.quote(sys.executable)
        with tempfile.TemporaryDirectory() as folder:
            if self._is_local:
                config_arg = job_path
            else:  # the job reads a local file: a remote store's copy travels as working_dir
                Path(folder, JOB_FILE).write_text(job_json)
                runtime_env["working_dir"] = folder
                config_arg = JOB_FILE
            try:
                client.submit_job(
                    entrypoint=f"{python} -m cluster.train --config {shlex.quote(config_arg)}",
                    submission_id=job_id,
                    runtime_env=runtime_env,
                    metadata=job_metadata(job, tenant),
                )
            except RuntimeError as e:
                # The SDK's HTTP failures, such as "No available agent to submit job" while
                # the head's dashboard agent is (re)starting: nothing was submitted.
                self.fs.rm(run, recursive=True)
                raise JobServerUnavailable(
                    f"the Ray job server did not take the job: {str(e)[:300]}"
                ) from e
        return {"job_id": job_id, "status_url": f"/train/{job_id}"}

    # Reading

    def status(self, job_id: str, tenant: str | None = None) -> dict:
        """Ray's state merged with the run's status.json, with URLs for its files."""
        info = self._info(job_id, tenant)
        progress = self._run_status(job_id)
        job = self._job(job_id)
        body = progress.model_dump()
        body.update(
            job_id=job_id,
            state=str(info.status),
            message=info.message,
            start_time_ms=info.start_time,
            end_time_ms=info.end_time,
            base_model=job.base_model if job else info.metadata.get("loraplex.base_model"),
            lora_name=job.output_file if job else info.metadata.get("loraplex.lora_name"),
            tenant=info.metadata.get("loraplex.tenant"),
            samples=[f"/train/{job_id}/samples/{name}" for name in progress.samples],
            loss_url=f"/train/{job_id}/{LOSS_CURVE_FILE}",
            logs_url=f"/train/{job_id}/logs",
        )
        body["jobs_ahead"] = []
        if body["state"] == "PENDING":  # Ray's own: the job's driver has not started yet
            body["waiting_for"] = "the Ray job server to start the job's driver"
        if self._waiting(info, progress):
            body["state"] = "PENDING"
            body["message"] = f"Waiting for {progress.waiting_for}."
            body["jobs_ahead"] = self._jobs_ahead(info)
        if body["state"] in ("FAILED", "STOPPED"):
            body["eta_s"] = None  # status.json stops where the run was cut off
            body["error"] = body["error"] or info.message
        return body

    def list(self, tenant: str | None = None) -> list[dict]:
        """Every training job Ray knows, newest first (state and names only); `tenant`'s
        only, unless None."""
        jobs = [
            info
            for info in self.client.list_jobs()
            if (info.metadata or {}).get("loraplex.kind") == "train"
            and info.submission_id
            and _visible(info, tenant)
        ]
        jobs.sort(key=lambda info: info.start_time or 0, reverse=True)
        return [
            {
                "job_id": info.submission_id,
                "state": "PENDING" if self._waiting(info) else str(info.status),
                "base_model": info.metadata.get("loraplex.base_model"),
                "lora_name": info.metadata.get("loraplex.lora_name"),
                "tenant": info.metadata.get("loraplex.tenant"),
                "start_time_ms": info.start_time,
            }
            for info in jobs
        ]

    def using_dataset(self, dataset: str) -> list[str]:
        """The training jobs that have not ended and train on `dataset` (by name under the
        dataset root), by id: their workers read its images when they start, and again when
        a run resumes after a worker is lost."""
        return [
            info.submission_id
            for info in self.client.list_jobs()
            if (info.metadata or {}).get("loraplex.kind") == "train"
            and info.submission_id
            and str(info.status) not in TERMINAL_STATES
            and (job := self._job(info.submission_id)) is not None
            and job.dataset is not None
            and str(job.dataset) == dataset
        ]

    def logs(self, job_id: str, lines: int, tenant: str | None = None) -> str:
        self._info(job_id, tenant)
        text = self.client.get_job_logs(job_id)
        return "".join(text.splitlines(keepends=True)[-lines:])

    def run_file(self, job_id: str, *parts: str, tenant: str | None = None) -> bytes:
        """A file of the run folder (loss.png, samples/<file>); NotFound until written."""
        self._info(job_id, tenant)
        path = posixpath.join(self._run_path(job_id), *parts)
        try:
            return self.fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise NotFound(f"{'/'.join(parts)}: not written yet for {job_id}") from e

    def sample(self, job_id: str, filename: str, tenant: str | None = None) -> bytes:
        if not SAMPLE_FILE.match(filename):
            raise NotFound(f"samples/{filename}: no such sample")
        return self.run_file(job_id, SAMPLES_FOLDER, filename, tenant=tenant)

    # Stopping

    def stop(self, job_id: str, tenant: str | None = None) -> dict:
        """Stop a pending or running job and wait until Ray says it ended; a job that has
        already ended has its record and run folder removed (never its published LoRA)."""
        info = self._info(job_id, tenant)
        if str(info.status) in TERMINAL_STATES:
            self.client.delete_job(job_id)
            run = self._run_path(job_id)
            if self.fs.exists(run):
                self.fs.rm(run, recursive=True)
            return {"job_id": job_id, "state": str(info.status), "deleted": True}
        self.client.stop_job(job_id)
        deadline = time.monotonic() + STOP_WAIT_S
        state = str(self.client.get_job_status(job_id))
        while state not in TERMINAL_STATES and time.monotonic() < deadline:
            time.sleep(0.25)
            state = str(self.client.get_job_status(job_id))
        return {"job_id": job_id, "state": state, "deleted": False}

    # Internals

    @property
    def _is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def _run_path(self, job_id: str) -> str:
        return posixpath.join(self.storage_root, job_id)

    def _info(self, job_id: str, tenant: str | None = None):
        """Ray's record of a training job; NotFound for ids that are not ours or unknown, and
        for another tenant's job (`tenant` None: any job)."""
        if not JOB_ID.match(job_id):
            raise NotFound(f"training job not found: {job_id}")
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as e:
            # The SDK reports HTTP failures as RuntimeError with the status in the text.
            if "status code 404" in str(e):
                raise NotFound(f"training job not found: {job_id}") from e
            raise
        if (info.metadata or {}).get("loraplex.kind") != "train" or not _visible(info, tenant):
            raise NotFound(f"training job not found: {job_id}")
        return info

    def _waiting(self, info, progress: RunStatus | None = None) -> bool:
        """Whether a job Ray runs still waits for its workers' resources (the job's driver
        runs at once and writes PENDING with what it waits for until they are placed)."""
        if str(info.status) != "RUNNING":
            return False
        progress = progress or self._run_status(info.submission_id)
        return progress.state == "PENDING" and progress.waiting_for is not None

    def _jobs_ahead(self, info) -> list[str]:
        """The training jobs submitted before this one that wait too, oldest first: placement
        groups waiting for the same resources are placed in the order they were made."""
        earlier = [
            other
            for other in self.client.list_jobs()
            if (other.metadata or {}).get("loraplex.kind") == "train"
            and other.submission_id
            and other.submission_id != info.submission_id
            and (other.start_time or 0) < (info.start_time or 0)
        ]
        earlier.sort(key=lambda other: other.start_time or 0)
        return [
            other.submission_id
            for other in earlier
            if str(other.status) == "PENDING" or self._waiting(other)
        ]

    def _run_status(self, job_id: str) -> RunStatus:
        path = posixpath.join(self._run_path(job_id), STATUS_FILE)
        try:
            return RunStatus.model_validate_json(self.fs.cat_file(path))
        except FileNotFoundError:
            return RunStatus()
        except ValueError:  # caught mid-write on a store without atomic replace: next time
            return RunStatus()

    def _job(self, job_id: str) -> TrainJob | None:
        try:
            data = self.fs.cat_file(posixpath.join(self._run_path(job_id), JOB_FILE))
            return TrainJob.model_validate_json(data)
        except (FileNotFoundError, ValueError):
            return None


def job_runtime_env(gcs_address: str | None) -> dict:
    """The job's environment variables, with the cluster's GCS address as CLUSTER_ADDRESS_ENV:
    Ray's job supervisor sets RAY_ADDRESS to the cluster it finds itself, which is the latest
    one started where a machine runs several, not necessarily this one."""
    env_vars = {name: os.environ[name] for name in JOB_ENV_VARS if name in os.environ}
    if gcs_address:
        env_vars[CLUSTER_ADDRESS_ENV] = gcs_address
    return {"env_vars": env_vars}


def job_metadata(job: TrainJob, tenant: str | None = None) -> dict[str, str]:
    """What `ray job list` shows, and how the API knows its own jobs and their tenant."""
    metadata = {
        "loraplex.kind": "train",
        "loraplex.base_model": job.base_model,
        "loraplex.lora_name": job.output_file,
    }
    if tenant is not None:
        metadata["loraplex.tenant"] = tenant
    return metadata


def _visible(info, tenant: str | None) -> bool:
    """Whether a key of `tenant` sees a job: its own tenant's only; a key without one, all."""
    return tenant is None or (info.metadata or {}).get("loraplex.tenant") == tenant


def read_job_file(path: str) -> dict:
    """A job file's fields: YAML or JSON (JSON is YAML), local path or fsspec URI."""
    import yaml

    with fsspec.open(path, "rb") as file:
        text = file.read().decode("utf-8")
    fields = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
    if not isinstance(fields, dict):
        raise InvalidRequest(f"{path}: expected a mapping of TrainJob fields")
    return fields
