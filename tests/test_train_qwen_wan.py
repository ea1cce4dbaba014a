"""Tiny Qwen-Image and Wan LoRAs trained with Ray Train (flow matching), published, loaded back.

Wan trains on images as one-frame videos, as musubi-tuner and AI Toolkit do for characters."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.train.run import run
from deployments import load_pipeline
from tests.train_jobs import load_published, render, tiny_job, write_dataset

# Trains, or starts services of its own: left out of `make test-fast`.
pytestmark = pytest.mark.slow


# Wan's tiny transformer sees 2x2 tokens per 64-pixel image, so it takes more steps to fit.
@pytest.mark.parametrize(("family", "steps"), [("qwen_image", 30), ("wan", 60)])
def test_job_trains_publishes_and_changes_the_output(ray_cluster, tmp_path, family, steps):
    job = tiny_job(
        tmp_path,
        family,
        write_dataset(tmp_path / "data"),
        max_train_steps=steps,
        learning_rate=5e-2,
        export_kohya=True,
        sample_prompts=["ohwx, a circle"],  # sampled once, at the end (Wan: one frame)
    )
    status = run(job)
    assert status.state == "SUCCEEDED", status.error
    assert status.step == steps and status.output_lora == f"character-{family}-test.safetensors"
    # On a fixed batch with fixed noise and timesteps, the trained LoRA fits clearly better.
    assert status.validation_loss < 0.8 * status.initial_validation_loss, status
    assert status.samples == [f"step-{steps:06d}-0.png"]

    pipe = load_pipeline(family, f"tiny://{family}")
    base = render(pipe, family)
    tensors, metadata = load_published(job)
    assert metadata["loraplex.base_model"] == family
    assert all(k.startswith("transformer.") for k in tensors)
    trained = render(pipe, family, "trained", tensors, metadata)
    # The pipeline is deterministic (the base twice is the same to the bit), so any change is
    # the LoRA's; the tiny Wan decodes 2x2 tokens into 64x64 pixels, spreading it thin.
    assert np.array_equal(render(pipe, family), base)
    change = np.abs(trained - base)
    assert change.max() > 2e-3 and change.mean() > 2e-4, (change.max(), change.mean())
    # The kohya copy loads back, through diffusers' conversion, to the same output.
    kohya, kohya_metadata = load_published(job, f"character-{family}-test.kohya.safetensors")
    assert all(k.startswith("lora_unet_") for k in kohya)
    from_kohya = render(pipe, family, "kohya", kohya, kohya_metadata)
    assert np.abs(from_kohya - trained).max() < 1e-3
