"""A worker killed mid-run: Ray Train restarts the group, the loop resumes from the last
checkpoint, and the run ends where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

from cluster.train.loop_config import CRASH_AT_STEP_ENV, CRASH_MARKER_ENV
from cluster.train.run import run
from tests.train_jobs import load_published, tiny_job, write_dataset

# Trains, or starts services of its own: left out of `make test-fast`.
pytestmark = pytest.mark.slow

STEPS = 12


def _job(tmp, dataset, name):
    job = tiny_job(
        tmp / name,
        "flux",
        dataset,
        num_workers=2,
        max_train_steps=STEPS,
        save_every=5,
        max_failures=1,
        caption_dropout=0.25,
        noise_offset=0.05,
    )
    return job


def test_killed_worker_resumes_to_the_same_weights(ray_cluster, tmp_path, monkeypatch):
    dataset = write_dataset(tmp_path / "data")
    straight = run(_job(tmp_path, dataset, "straight"))
    assert straight.state == "SUCCEEDED", straight.error

    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_AT_STEP_ENV, "7")  # rank 1 exits once, after the step-5 checkpoint
    monkeypatch.setenv(CRASH_MARKER_ENV, str(marker))
    crashed_job = _job(tmp_path, dataset, "crashed")
    crashed = run(crashed_job)
    assert marker.exists(), "the worker did not crash"
    assert crashed.state == "SUCCEEDED", crashed.error
    assert crashed.step == straight.step == STEPS

    ours, _ = load_published(crashed_job)
    theirs, _ = load_published(_job(tmp_path, dataset, "straight"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    assert abs(crashed.validation_loss - straight.validation_loss) < 1e-4


def test_a_run_out_of_failures_is_failed_and_publishes_nothing(ray_cluster, tmp_path, monkeypatch):
    job = tiny_job(
        tmp_path, "flux", write_dataset(tmp_path / "data"), max_train_steps=6, max_failures=0
    )
    monkeypatch.setenv(CRASH_AT_STEP_ENV, "3")  # one worker: rank 0 exits
    monkeypatch.setenv(CRASH_MARKER_ENV, str(tmp_path / "crashed"))
    status = run(job)
    assert status.state == "FAILED" and status.error
    assert not (tmp_path / "loras" / job.output_file).exists()
