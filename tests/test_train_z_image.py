"""A tiny Z-Image LoRA trained with Ray Train, published, and loaded back into the pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.train.run import run
from deployments import load_pipeline
from tests.train_jobs import load_published, render, tiny_job, write_dataset

# Trains, or starts services of its own: left out of `make test-fast`.
pytestmark = pytest.mark.slow


def test_z_image_job_trains_and_publishes(ray_cluster, tmp_path):
    job = tiny_job(
        tmp_path,
        "z_image",
        write_dataset(tmp_path / "data"),
        max_train_steps=40,
        learning_rate=5e-2,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        export_kohya=True,
    )
    status = run(job)
    assert status.state == "SUCCEEDED", status.error
    assert status.step == 40 and status.output_lora == "character-z_image-test.safetensors"
    assert status.validation_loss < 0.8 * status.initial_validation_loss, status
    assert status.lr is not None and status.lr < 5e-2  # cosine decayed

    pipe = load_pipeline("z_image", "tiny://z_image")
    base = render(pipe, "z_image")
    tensors, metadata = load_published(job)
    trained = render(pipe, "z_image", "trained", tensors, metadata)
    assert np.abs(trained - base).mean() > 1e-3
    kohya, kohya_metadata = load_published(job, "character-z_image-test.kohya.safetensors")
    assert all(k.startswith("lora_unet_layers_") or "refiner" in k for k in kohya)
    from_kohya = render(pipe, "z_image", "kohya", kohya, kohya_metadata)
    assert np.abs(from_kohya - trained).max() < 1e-3
