"""What each training worker is handed (`loop_config_for`), and the crash injection the
resume tests use: a worker of rank CRASH_RANK exits at a step, once, when the driver's
environment names one."""

from __future__ import annotations

import json
import os
import posixpath
import tempfile

from cluster.train.config import TrainJob

# Test-only fault injection: rank CRASH_RANK exits at this step once (a marker file says it did).
CRASH_AT_STEP_ENV = "LORAPLEX_TRAIN_CRASH_AT_STEP"
CRASH_MARKER_ENV = "LORAPLEX_TRAIN_CRASH_MARKER"
CRASH_RANK = 1


def loop_config_for(job: TrainJob, total_steps: int, run_dir: str, dataset_hash: str) -> dict:
    config = {
        "job": json.loads(job.model_dump_json()),
        "total_steps": total_steps,
        "run_dir": run_dir,
        "dataset_hash": dataset_hash,
    }
    crash_at = os.environ.get(CRASH_AT_STEP_ENV)
    if crash_at:
        config["crash_at_step"] = int(crash_at)
        config["crash_marker"] = os.environ.get(CRASH_MARKER_ENV) or posixpath.join(
            tempfile.gettempdir(), "loraplex-crash-marker"
        )
    return config
