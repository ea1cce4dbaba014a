"""A run's progress as Ray metrics, beside its status.json: the step, total steps and loss of
each run, tagged by job id (the run's folder name, which is the job id of a `POST /train` job)
and base model. Ray's Prometheus export names them `ray_loraplex_train_step`,
`ray_loraplex_train_total_steps` and `ray_loraplex_train_loss`; cluster/grafana/loraplex.json
plots them."""

from __future__ import annotations

import functools
import json
import math
import posixpath
from dataclasses import dataclass

import ray
from ray.util import metrics

from cluster.train.config import JOB_FILE, RunStatus
from deployments.storage import shared_root

TAG_KEYS = ("job_id", "base_model")
UNKNOWN_MODEL = "unknown"


@dataclass(frozen=True)
class TrainGauges:
    step: metrics.Gauge
    total_steps: metrics.Gauge
    loss: metrics.Gauge


@functools.cache
def train_gauges() -> TrainGauges:
    """Declared once per process, on first use: a metric needs a connected Ray worker."""
    return TrainGauges(
        step=metrics.Gauge(
            "loraplex_train_step", "Optimizer steps a training run has done.", tag_keys=TAG_KEYS
        ),
        total_steps=metrics.Gauge(
            "loraplex_train_total_steps", "Optimizer steps a training run will do.", TAG_KEYS
        ),
        loss=metrics.Gauge("loraplex_train_loss", "Training loss at the last step.", TAG_KEYS),
    )


_base_models: dict[str, str] = {}


def base_model(run_dir: str) -> str:
    """The family the run trains, from the job.json the driver writes before any worker
    starts; read once per run and process (a GET on an object store)."""
    if run_dir not in _base_models:
        fs, path = shared_root(posixpath.join(run_dir, JOB_FILE))
        try:
            family = json.loads(fs.cat_file(path)).get("base_model")
        except (OSError, ValueError):
            return UNKNOWN_MODEL  # not remembered: the file may be there next time
        _base_models[run_dir] = str(family or UNKNOWN_MODEL)
    return _base_models[run_dir]


def record_progress(run_dir: str, status: RunStatus) -> None:
    """Set the run's gauges from the status just written. Outside Ray (the driver before it
    connects) there is no metrics agent to report to, so nothing is recorded."""
    if not ray.is_initialized():
        return
    tags = {"job_id": posixpath.basename(run_dir.rstrip("/")), "base_model": base_model(run_dir)}
    gauges = train_gauges()
    gauges.step.set(status.step, tags=tags)
    gauges.total_steps.set(status.total_steps, tags=tags)
    if status.loss is not None and math.isfinite(status.loss):
        gauges.loss.set(status.loss, tags=tags)
