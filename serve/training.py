"""`/datasets` and `/train`: dataset storage and training jobs submitted as Ray jobs.

A training run is a Ray job (`python -m cluster.train --config <run>/job.json`) submitted through
Ray's job submission server, so `ray job list` / `ray job logs` see it too. Its state is Ray's
(PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); its progress is the `status.json` that rank 0
rewrites in the run folder `<train_storage_path>/<job_id>/` (layout in cluster/train/config.py).
"""

from __future__ import annotations

import base64
import binascii
import io
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
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from cluster.train.checks import check_job
from cluster.train.config import (
    JOB_FILE,
    LOSS_CURVE_FILE,
    SAMPLES_FOLDER,
    STATUS_FILE,
    RunStatus,
    TrainJob,
)
from deployments.errors import InvalidRequest, JobServerUnavailable, LoraplexError, NotFound
from deployments.loras.remote import check_url
from deployments.storage import shared_root
from serve.config import AppConfig

MAX_DATASET_IMAGES = 10_000
MAX_NAME_CHARS = 256
STAGING_FOLDER = ".staging"
IMAGE_SUFFIX = ".png"
CAPTION_SUFFIX = ".txt"
# An uploaded file's name becomes `<stem>.png` + `<stem>.txt`: plain characters, no folders.
FILE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()+-]{0,127}$")
NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
JOB_ID = re.compile(r"^train-[0-9a-f]{32}$")
SAMPLE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.png$")
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
# The run folder and paths the job reads are the server's to choose, never a client's.
SERVER_FIELDS = ("lora_root", "dataset_root", "storage_path", "run_name")
# Passed to the job as they are here: offline hub, reproducible CPU matmuls, quiet tokenizers.
JOB_ENV_VARS = ("HF_HUB_OFFLINE", "MKL_CBWR", "TOKENIZERS_PARALLELISM")
STOP_WAIT_S = 30.0


class DatasetImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=256, description="e.g. img01.jpg")
    content: str = Field(min_length=1, description="The image file, base64.")
    caption: str = Field(default="", max_length=4000)


class DatasetUpload(BaseModel):
    """`PUT /datasets/{name}` as JSON: the whole dataset; it replaces any of that name."""

    model_config = ConfigDict(extra="forbid")

    images: list[DatasetImage] = Field(min_length=1, max_length=MAX_DATASET_IMAGES)


def check_dataset_name(name: str, field: str = "name") -> str:
    """A dataset name: folders of plain parts under the dataset root, never outside it."""
    parts = name.split("/")
    if (
        not name
        or len(name) > MAX_NAME_CHARS
        or "://" in name
        or name.startswith("/")
        or any(not NAME_PART.match(part) or part in (".", "..") for part in parts)
    ):
        raise InvalidRequest(
            f"{field}: {name!r} is not a dataset name (relative, letters, digits, '_', '-', '.' "
            "in each part; no '..', no absolute path, no hidden parts)"
        )
    return name


def image_as_png(data: bytes, filename: str, field: str) -> bytes:
    """The image fully decoded (a truncated file fails here, not in training), as PNG bytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format == "PNG":
                return data
            out = io.BytesIO()
            keep = image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGB")
            keep.save(out, format="PNG")
            return out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"{field}: {filename} is not a readable image ({e})") from e


def _stem(filename: str, field: str) -> str:
    stem = posixpath.splitext(filename)[0]
    if "/" in filename or "\\" in filename or not FILE_STEM.match(stem) or stem.endswith("."):
        raise InvalidRequest(f"{field}: {filename!r} is not a plain file name")
    return stem


class Datasets:
    """Datasets under one fsspec root: `<name>/<stem>.png` + `<stem>.txt` pairs."""

    def __init__(self, root: str):
        self.fs, root_path = shared_root(root)
        self.root = root_path.rstrip("/") or "/"
        self._is_local = isinstance(self.fs, LocalFileSystem)

    def pairs_from_json(self, upload: DatasetUpload) -> dict[str, tuple[bytes, str]]:
        """stem -> (PNG bytes, caption), every image decoded; nothing is written."""
        files = []
        for index, item in enumerate(upload.images):
            field = f"images.{index}.content"
            content = (
                item.content.split(",", 1)[1] if item.content.startswith("data:") else item.content
            )
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as e:
                raise InvalidRequest(f"{field}: not valid base64 ({e})") from e
            files.append((f"images.{index}", item.filename, data, item.caption))
        return self._pairs(files)

    def pairs_from_form(self, parts: list[tuple[str, str | None, bytes]]) -> dict:
        """The same from multipart parts (field name, file name or None, bytes): image files,
        and captions as `<stem>.txt` files or as text fields named `<stem>.txt`."""
        captions, images = {}, []
        for field, filename, data in parts:
            name = filename if filename is not None else field
            if name.lower().endswith(CAPTION_SUFFIX):
                try:
                    captions[_stem(name, field)] = data.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise InvalidRequest(f"{field}: {name} is not UTF-8 text") from e
            elif filename is not None:
                images.append((field, filename, data))
        stems = {_stem(filename, field) for field, filename, _ in images}
        for stem in captions:
            if stem not in stems:
                raise InvalidRequest(f"{stem}{CAPTION_SUFFIX}: a caption for no uploaded image")
        files = [(f, n, d, captions.get(_stem(n, f), "")) for f, n, d in images]
        if not files:
            raise InvalidRequest("images: no image files in the upload")
        if len(files) > MAX_DATASET_IMAGES:
            raise InvalidRequest(f"images: {len(files)} files; at most {MAX_DATASET_IMAGES}")
        return self._pairs(files)

    def _pairs(self, files: list[tuple[str, str, bytes, str]]) -> dict[str, tuple[bytes, str]]:
        pairs = {}
        for field, filename, data, caption in files:
            stem = _stem(filename, field)
            if stem in pairs:
                raise InvalidRequest(f"{field}: {filename}: another image is also named {stem}")
            pairs[stem] = (image_as_png(data, filename, field), caption)
        return pairs

    def write(self, name: str, pairs: dict[str, tuple[bytes, str]]) -> dict:
        """Write the dataset in one step: staged whole, then moved over any old one."""
        target = posixpath.join(self.root, check_dataset_name(name))
        staged = posixpath.join(self.root, STAGING_FOLDER, uuid.uuid4().hex)
        self.fs.makedirs(staged, exist_ok=True)
        try:
            for stem, (png, caption) in pairs.items():
                self.fs.pipe_file(posixpath.join(staged, stem + IMAGE_SUFFIX), png)
                self.fs.pipe_file(posixpath.join(staged, stem + CAPTION_SUFFIX), caption.encode())
            self._replace(staged, target)
        finally:
            if self.fs.exists(staged):
                self.fs.rm(staged, recursive=True)
        return self.describe(name)

    def _replace(self, staged: str, target: str) -> None:
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        old = f"{staged}.old"
        if self.fs.exists(target):
            self.fs.mv(target, old, recursive=True)
        if self._is_local:
            os.replace(staged, target)
        else:
            self.fs.mv(staged, target, recursive=True)
        if self.fs.exists(old):
            self.fs.rm(old, recursive=True)

    def describe(self, name: str) -> dict:
        """The dataset's images (name, bytes, caption); NotFound when absent."""
        folder = posixpath.join(self.root, check_dataset_name(name))
        try:
            listing = self.fs.ls(folder, detail=True)
        except FileNotFoundError as e:
            raise NotFound(f"dataset not found: {name}") from e
        sizes = {posixpath.basename(i["name"]): int(i.get("size") or 0) for i in listing}
        images = []
        for filename in sorted(sizes):
            if filename.endswith(IMAGE_SUFFIX):
                caption_file = posixpath.join(folder, filename[: -len(IMAGE_SUFFIX)] + ".txt")
                caption = ""
                if self.fs.exists(caption_file):
                    caption = self.fs.cat_file(caption_file).decode("utf-8", "replace")
                images.append(
                    {"filename": filename, "size_bytes": sizes[filename], "caption": caption}
                )
        return {"name": name, "images": images}


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
            try:
                self._client = JobSubmissionClient(address)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise JobServerUnavailable(
                    f"the Ray job server at {address} is not reachable ({e}); training needs "
                    "the Ray dashboard (ray start --head --include-dashboard=true)"
                ) from e
        return self._client

    # Submission

    def job_fields(self, body: object, job_id: str) -> dict:
        """A TrainJob's fields from a client's body, with the server's paths filled in and
        the base model's URI the served one; refusals name the field."""
        if not isinstance(body, dict):
            raise InvalidRequest("body: expected a JSON object")
        for field in SERVER_FIELDS:
            if field in body:
                raise InvalidRequest(f"{field}: chosen by the server; leave it out")
        family = body.get("base_model")
        served = [m.model_uri for m in self.config.models if m.family == family]
        model_uri = body.get("model_uri") or (served[0] if served else "")
        if family is not None and isinstance(family, str) and served and model_uri not in served:
            raise InvalidRequest(
                f"model_uri: {model_uri!r} is not served here; train on a served base model "
                f"({', '.join(served)}) or leave it out"
            )
        if isinstance(body.get("dataset"), str):
            check_dataset_name(body["dataset"], "dataset")
        for index, item in enumerate(body.get("image_urls") or []):
            if isinstance(item, dict) and isinstance(item.get("url"), str):
                check_url(item["url"], self.config.remote_loras, f"image_urls.{index}.url")
        return {
            **body,
            "model_uri": model_uri,
            "run_name": job_id,
            "lora_root": self.config.lora_root,
            "dataset_root": self.config.dataset_root,
            "storage_path": self.config.train_storage_path,
        }

    def check(self, job: TrainJob) -> None:
        """Refuse what would fail once workers start: a family not served here, and what the
        job's own checks find (a family it cannot train, an empty dataset, an unreadable
        image, ...), so a refused job never becomes a Ray job."""
        if not any(m.family == job.base_model for m in self.config.models):
            raise InvalidRequest(f"base_model: no {job.base_model} model is served here")
        try:
            check_job(job)
        except LoraplexError as e:
            raise InvalidRequest(_with_field(e.message)) from e
        except (ValueError, OSError) as e:
            raise InvalidRequest(_with_field(str(e))) from e

    def submit(self, job_id: str, job: TrainJob) -> dict:
        """Write the job file into the run folder and submit the run as a Ray job."""
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
            client.submit_job(
                entrypoint=f"{python} -m cluster.train --config {shlex.quote(config_arg)}",
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata=job_metadata(job),
            )
        return {"job_id": job_id, "status_url": f"/train/{job_id}"}

    # Reading

    def status(self, job_id: str) -> dict:
        """Ray's state merged with the run's status.json, with URLs for its files."""
        info = self._info(job_id)
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
            samples=[f"/train/{job_id}/samples/{name}" for name in progress.samples],
            loss_url=f"/train/{job_id}/{LOSS_CURVE_FILE}",
            logs_url=f"/train/{job_id}/logs",
        )
        if body["state"] in ("FAILED", "STOPPED"):
            body["eta_s"] = None  # status.json stops where the run was cut off
            body["error"] = body["error"] or info.message
        return body

    def list(self) -> list[dict]:
        """Every training job Ray knows, newest first (state and names only)."""
        jobs = [
            info
            for info in self.client.list_jobs()
            if (info.metadata or {}).get("loraplex.kind") == "train" and info.submission_id
        ]
        jobs.sort(key=lambda info: info.start_time or 0, reverse=True)
        return [
            {
                "job_id": info.submission_id,
                "state": str(info.status),
                "base_model": info.metadata.get("loraplex.base_model"),
                "lora_name": info.metadata.get("loraplex.lora_name"),
                "start_time_ms": info.start_time,
            }
            for info in jobs
        ]

    def logs(self, job_id: str, lines: int) -> str:
        self._info(job_id)
        text = self.client.get_job_logs(job_id)
        return "".join(text.splitlines(keepends=True)[-lines:])

    def run_file(self, job_id: str, *parts: str) -> bytes:
        """A file of the run folder (loss.png, samples/<file>); NotFound until written."""
        self._info(job_id)
        path = posixpath.join(self._run_path(job_id), *parts)
        try:
            return self.fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise NotFound(f"{'/'.join(parts)}: not written yet for {job_id}") from e

    def sample(self, job_id: str, filename: str) -> bytes:
        if not SAMPLE_FILE.match(filename):
            raise NotFound(f"samples/{filename}: no such sample")
        return self.run_file(job_id, SAMPLES_FOLDER, filename)

    # Stopping

    def stop(self, job_id: str) -> dict:
        """Stop a pending or running job and wait until Ray says it ended; a job that has
        already ended has its record and run folder removed (never its published LoRA)."""
        info = self._info(job_id)
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

    def _info(self, job_id: str):
        """Ray's record of a training job; NotFound for ids that are not ours or unknown."""
        if not JOB_ID.match(job_id):
            raise NotFound(f"training job not found: {job_id}")
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as e:
            # The SDK reports HTTP failures as RuntimeError with the status in the text.
            if "status code 404" in str(e):
                raise NotFound(f"training job not found: {job_id}") from e
            raise
        if (info.metadata or {}).get("loraplex.kind") != "train":
            raise NotFound(f"training job not found: {job_id}")
        return info

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
    """The job's environment variables. With the cluster's GCS address as RAY_ADDRESS, Ray
    Train's helper actors that query the state API find this cluster even where a machine runs
    several (they would otherwise refuse to guess among them)."""
    env_vars = {name: os.environ[name] for name in JOB_ENV_VARS if name in os.environ}
    if gcs_address:
        env_vars["RAY_ADDRESS"] = gcs_address
    return {"env_vars": env_vars}


def job_metadata(job: TrainJob) -> dict[str, str]:
    """What `ray job list` shows, and how the API knows its own jobs."""
    return {
        "loraplex.kind": "train",
        "loraplex.base_model": job.base_model,
        "loraplex.lora_name": job.output_file,
    }


def _with_field(message: str) -> str:
    """Dataset problems are the `dataset` field's unless the message names one already."""
    head = message.split(":", 1)[0]
    return message if head and " " not in head else f"dataset: {message}"


def read_job_file(path: str) -> dict:
    """A job file's fields: YAML or JSON (JSON is YAML), local path or fsspec URI."""
    import yaml

    with fsspec.open(path, "rb") as file:
        text = file.read().decode("utf-8")
    fields = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
    if not isinstance(fields, dict):
        raise InvalidRequest(f"{path}: expected a mapping of TrainJob fields")
    return fields
