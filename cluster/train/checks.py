"""Everything a training job can be refused for before any worker starts.

Light to import (no Ray Train, no model): `POST /train` calls `check_job` before it submits."""

from __future__ import annotations

import importlib.util

from cluster.train.config import TrainJob
from cluster.train.data import DatasetSummary, check_dataset
from cluster.train.publish import check_output_free
from deployments.errors import InvalidRequest
from deployments.family import get_family

# Optimizers whose package is optional: refused before the job starts where it is missing.
OPTIONAL_OPTIMIZERS = {"adamw8bit": "bitsandbytes", "lion": "lion_pytorch"}


def check_job(job: TrainJob) -> DatasetSummary:
    """Everything that can be refused before a worker starts, with the field named:
    InvalidRequest for a family that cannot be trained, an option it lacks, a missing optimizer
    package, an empty dataset or an unreadable image; Conflict for an output name taken
    without `config.overwrite`. Returns the dataset's summary."""
    family = get_family(job.base_model)
    if family.training is None:
        raise InvalidRequest(
            f"base_model: training is not supported for {family.name} yet (an edit model "
            "trains on pairs of source and target images, which the dataset format lacks)"
        )
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
    if config.sample_every and not config.sample_prompts:
        raise InvalidRequest("config.sample_every: set sample_prompts too")
    check_output_free(job)
    summary = check_dataset(job)
    if config.lr_warmup_steps >= summary.total_steps:
        raise InvalidRequest(
            f"config.lr_warmup_steps: {config.lr_warmup_steps} is not below the "
            f"{summary.total_steps} training steps"
        )
    return summary
