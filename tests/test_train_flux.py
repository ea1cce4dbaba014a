"""A tiny Flux LoRA trained with two Ray Train workers, published, and served."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from cluster.train.config import RunStatus
from cluster.train.progress import run_dir_for
from cluster.train.run import run
from deployments import load_pipeline
from deployments.loras.store import LoraStore
from tests.train_jobs import load_published, render, tiny_job, write_dataset

# Trains, or starts services of its own: left out of `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flux_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-flux")
    dataset = write_dataset(tmp / "data")
    job = tiny_job(
        tmp,
        "flux",
        dataset,
        num_workers=2,
        max_train_steps=24,
        save_every=8,
        keep_checkpoints=2,
        sample_every=24,
        sample_prompts=["ohwx, a circle"],
        export_kohya=True,
    )
    return job, run(job)


def test_flux_job_succeeds_and_loss_falls(flux_run):
    job, status = flux_run
    assert status.state == "SUCCEEDED", status.error
    assert status.step == status.total_steps == 24
    assert status.workers == 2 and len(status.peak_rss_mb) == 2
    # On a fixed batch with fixed noise and timesteps, the trained LoRA fits clearly better.
    assert status.validation_loss < 0.8 * status.initial_validation_loss, status
    run_dir = run_dir_for(job)
    on_disk = RunStatus.model_validate_json(open(f"{run_dir}/status.json").read())
    assert on_disk.state == "SUCCEEDED" and on_disk.output_lora == job.output_file
    assert len(status.checkpoints) == 2  # keep_checkpoints
    assert open(f"{run_dir}/loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert status.samples == ["step-000024-0.png"]
    assert json.loads(open(f"{run_dir}/job.json").read())["base_model"] == "flux"


def test_flux_published_file_has_metadata(flux_run):
    job, _ = flux_run
    path = LoraStore(job.lora_root).path_of(job.output_file)
    assert job.output_file == "character-flux-test.safetensors"
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
        keys = list(file.keys())
    assert metadata["loraplex.base_model"] == "flux"
    assert metadata["loraplex.model_uri"] == "tiny://flux"
    assert metadata["loraplex.rank"] == "4" and metadata["loraplex.steps"] == "24"
    assert metadata["trigger_words"] == "ohwx" and len(metadata["loraplex.dataset_hash"]) == 64
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)


def test_flux_published_lora_changes_the_image(flux_run):
    job, _ = flux_run
    pipe = load_pipeline("flux", "tiny://flux")
    base = render(pipe, "flux")
    tensors, metadata = load_published(job)
    trained = render(pipe, "flux", "trained", tensors, metadata)
    assert np.abs(trained - base).mean() > 1e-3


def test_kohya_export_gives_the_same_image(flux_run):
    job, _ = flux_run
    pipe = load_pipeline("flux", "tiny://flux")
    tensors, metadata = load_published(job)
    kohya, kohya_metadata = load_published(job, "character-flux-test.kohya.safetensors")
    assert all(k.startswith("lora_transformer_") for k in kohya)
    assert any(k.endswith(".lora_down.weight") for k in kohya)
    diffusers_image = render(pipe, "flux", "diffusers", tensors, metadata)
    kohya_image = render(pipe, "flux", "kohya", kohya, kohya_metadata)
    assert np.abs(diffusers_image - kohya_image).max() < 1e-3
