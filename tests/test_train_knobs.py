"""Each training knob, exercised on one worker's loop run in-process (no Ray Train: the loop's
code is the same, `Trainer(..., rank_and_world=(0, 1))`), on tiny Flux: 64 px, rank 4, a few
steps. Real torch, diffusers and peft; the jobs under Ray are in test_train_{flux,resume}.py."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch
from PIL import Image

from cluster.train.checks import OPTIONAL_OPTIMIZERS, check_job
from cluster.train.config import TrainConfig
from cluster.train.data import StepOrder, bucket_size, check_dataset, load_images
from cluster.train.loop import Trainer
from cluster.train.loop_config import loop_config_for
from cluster.train.lora_setup import lora_tensors, make_scheduler
from cluster.train.objectives import noise_batch
from cluster.train.publish import adapter_file, adapter_metadata, kohya_name, publish
from deployments import load_pipeline
from deployments.errors import InvalidRequest
from tests.train_jobs import load_published, render, tiny_job, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("knobs") / "data")


def make_trainer(tmp: Path, dataset: Path, family: str = "flux", **config) -> Trainer:
    job = tiny_job(tmp, family, dataset, **config)
    summary = check_job(job)
    loop_config = loop_config_for(job, summary.total_steps, str(tmp / "run"), summary.dataset_hash)
    return Trainer(loop_config, rank_and_world=(0, 1))


def train(trainer: Trainer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step())
        trainer.step += 1
    return losses


def lora_b_moved(trainer: Trainer, component: str) -> bool:
    """lora_B starts at zero: any non-zero entry means the optimizer updated this component."""
    tensors = lora_tensors(trainer.pipe, trainer.components)
    return any(
        k.startswith(f"{component}.") and ".lora_B." in k and v.abs().max() > 0
        for k, v in tensors.items()
    )


# --- optimizer ----------------------------------------------------------------------------------


def test_adafactor_trains(tmp_path, dataset):
    trainer = make_trainer(tmp_path, dataset, optimizer="adafactor")
    assert type(trainer.optimizer).__name__ == "Adafactor"
    losses = train(trainer, 2)
    assert all(math.isfinite(loss) for loss in losses)
    assert lora_b_moved(trainer, "transformer")


@pytest.mark.parametrize("optimizer", sorted(OPTIONAL_OPTIMIZERS))
def test_optimizer_without_its_package_is_refused(tmp_path, dataset, optimizer):
    package = OPTIONAL_OPTIMIZERS[optimizer]
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    job = tiny_job(tmp_path, "flux", dataset, optimizer=optimizer)
    with pytest.raises(
        InvalidRequest, match=rf"^config.optimizer: {optimizer} needs the {package}"
    ):
        check_job(job)


# --- precision and memory -----------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_step(tmp_path, dataset):
    plain = make_trainer(tmp_path / "plain", dataset)
    checkpointed = make_trainer(tmp_path / "checkpointed", dataset, gradient_checkpointing=True)
    assert checkpointed.denoiser.is_gradient_checkpointing
    assert not plain.denoiser.is_gradient_checkpointing
    assert train(plain, 2) == pytest.approx(train(checkpointed, 2), rel=1e-5)
    ours = lora_tensors(checkpointed.pipe, checkpointed.components)
    theirs = lora_tensors(plain.pipe, plain.components)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_bf16_trains_on_cpu(tmp_path, dataset):
    full = make_trainer(tmp_path / "fp32", dataset)
    half = make_trainer(tmp_path / "bf16", dataset, mixed_precision="bf16")
    fp32_losses, bf16_losses = train(full, 2), train(half, 2)
    assert all(math.isfinite(loss) for loss in bf16_losses)
    # The same batch, noise and timesteps: bf16 matmuls move the loss a little, not a lot.
    assert bf16_losses[0] == pytest.approx(fp32_losses[0], rel=0.05)
    assert all(p.dtype == torch.float32 for p in half.params)  # LoRA weights stay fp32
    assert lora_b_moved(half, "transformer")


def test_fp16_trains_with_loss_scaling_and_resumes(tmp_path, dataset):
    full = make_trainer(tmp_path / "fp32", dataset)
    half = make_trainer(tmp_path / "fp16", dataset, mixed_precision="fp16")
    fp32_losses, fp16_losses = train(full, 2), train(half, 2)
    assert fp16_losses[0] == pytest.approx(fp32_losses[0], rel=0.01)
    assert half.scaler.is_enabled() and half.scaler.get_scale() > 1
    assert lora_b_moved(half, "transformer")

    # A checkpoint carries the loss scale with the optimizer and schedule: a trainer restored
    # from it takes the same next steps as the one that wrote it.
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    half.save_checkpoint(str(folder))
    resumed = make_trainer(tmp_path / "fp16", dataset, mixed_precision="fp16")
    resumed.restore(ray.train.Checkpoint.from_directory(str(folder)))
    assert resumed.step == 2 and resumed.scaler.get_scale() == half.scaler.get_scale()
    assert train(resumed, 2) == pytest.approx(train(half, 2), rel=1e-6)


# --- text encoder -------------------------------------------------------------------------------


TEXT_ENCODERS = {"flux": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}
KOHYA_TEXT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@pytest.mark.parametrize("family", sorted(TEXT_ENCODERS))
def test_text_encoder_lora_trains_publishes_and_serves(tmp_path, dataset, family):
    trainer = make_trainer(
        tmp_path,
        dataset,
        family=family,
        train_text_encoder=True,
        export_kohya=True,
        learning_rate=5e-2,
    )
    encoders = TEXT_ENCODERS[family]
    assert trainer.components == [trainer.family.denoiser_component, *encoders]
    train(trainer, 3)
    for encoder in encoders:
        assert lora_b_moved(trainer, encoder), f"no gradient reached {encoder}"
    tensors = lora_tensors(trainer.pipe, trainer.components)
    # CLIP keys as diffusers, ComfyUI and kohya name them (with `text_model.`).
    text_keys = [k for k in tensors if k.startswith("text_encoder")]
    assert text_keys and all(".text_model.encoder.layers." in k for k in text_keys)

    job = trainer.job
    metadata = adapter_metadata(job, trainer.step, trainer.dataset_hash, trainer.components)
    publish(job, adapter_file(tensors, metadata))
    served, served_metadata = load_published(job)
    assert served.keys() == tensors.keys()

    pipe = load_pipeline(family, f"tiny://{family}")
    base = render(pipe, family)
    full = render(pipe, family, "full", served, served_metadata)
    assert np.abs(full - base).mean() > 1e-3
    # The text-encoder part alone changes the image too: serving loads and applies those keys.
    text_only = {k: v for k, v in served.items() if k.startswith("text_encoder")}
    text_image = render(pipe, family, "text-only", text_only, served_metadata)
    assert np.abs(text_image - base).mean() > 1e-3

    # The kohya copy names CLIP as kohya and ComfyUI do, and loads to the same images.
    kohya, kohya_metadata = load_published(job, kohya_name(job.output_file))
    prefixes = tuple(KOHYA_TEXT_PREFIXES[e] for e in encoders)
    kohya_text = {k: v for k, v in kohya.items() if k.startswith(prefixes)}
    assert {k.split("text_model_encoder_layers_")[0] for k in kohya_text} == set(prefixes)
    kohya_image = render(pipe, family, "kohya", kohya, kohya_metadata)
    assert np.abs(kohya_image - full).max() < 1e-3
    kohya_text_image = render(pipe, family, "kohya-text", kohya_text, kohya_metadata)
    assert np.abs(kohya_text_image - text_image).max() < 1e-3


# --- data ---------------------------------------------------------------------------------------


def _write_shaped(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i % 255, 120, 200)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"shape {i}")
    return folder


def test_bucket_sizes_fill_the_pixel_budget_at_the_image_ratio():
    budget = 1024 * 1024
    for ratio in (0.5, 0.6, 0.75, 0.9, 1.0, 1.1, 4 / 3, 1.5, 16 / 9, 2.0):
        width, height = bucket_size((round(1000 * ratio), 1000), 1024, True)
        assert width % 64 == 0 and height % 64 == 0
        assert 0.85 * budget <= width * height <= budget, (ratio, width, height)
        assert abs(math.log(width / height) - math.log(ratio)) < 0.12, (ratio, width, height)
    assert bucket_size((4000, 1000), 1024, True) == bucket_size((2000, 1000), 1024, True)  # 2:1 cap


def test_batches_never_mix_buckets(tmp_path):
    sizes = [(128, 128), (256, 128), (128, 256), (192, 128), (250, 120), (100, 100), (120, 250)]
    folder = _write_shaped(tmp_path / "shaped", sizes)
    job = tiny_job(tmp_path, "flux", folder, resolution=128, batch_size=2)
    summary = check_dataset(job)
    assert summary.buckets == {"128x128": 2, "128x64": 3, "64x128": 2}
    samples = load_images(job)
    for sample in samples:
        width, height = sample.bucket
        assert tuple(sample.pixels.shape) == (3, height, width)
    buckets = [s.bucket for s in samples]
    for workers in (1, 2, 3):
        order = StepOrder(buckets, batch_size=2, workers=workers, repeats=2, seed=3)
        for micro_step in range(40):
            together = [i for rank in range(workers) for i in order.batch(micro_step, rank)]
            assert len(together) == 2 * workers
            assert len({buckets[i] for i in together}) == 1
    square = tiny_job(tmp_path, "flux", folder, resolution=128, aspect_ratio_buckets=False)
    assert check_dataset(square).buckets == {"128x128": 7}

    # The loop itself trains on the mixed-ratio set, a batch of 2 per step.
    trainer = make_trainer(tmp_path, folder, resolution=128, batch_size=2)
    assert all(math.isfinite(loss) for loss in train(trainer, 3))


def test_repeats_show_each_image_that_many_times_per_epoch():
    order = StepOrder([(64, 64)] * 4, batch_size=1, workers=1, repeats=3, seed=0)
    epoch = [order.batch(step, 0)[0] for step in range(12)]
    assert sorted(epoch) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_default_steps_are_100_per_image(tmp_path):
    data = write_dataset(tmp_path / "three", count=3)
    job = tiny_job(tmp_path, "flux", data, max_train_steps=None, repeats=5)
    assert check_job(job).total_steps == 300  # the guide's 100 x images; repeats do not count


def test_caption_dropout_trains_on_empty_captions(tmp_path, dataset):
    never = make_trainer(tmp_path / "never", dataset, caption_dropout=0.0)
    always = make_trainer(tmp_path / "always", dataset, caption_dropout=1.0)
    half = make_trainer(tmp_path / "half", dataset, caption_dropout=0.5, max_train_steps=20)
    train(never, 2)
    train(always, 2)
    train(half, 8)
    # The text-embedding cache holds exactly the captions the steps were trained on.
    assert never.prompt_cache and "" not in never.prompt_cache
    assert list(always.prompt_cache) == [""]
    assert "" in half.prompt_cache and len(half.prompt_cache) > 1


def test_noise_offset_shifts_each_channel_by_a_constant():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler = load_pipeline("flux", "tiny://flux").scheduler

    def target(offset: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        return noise_batch("flow_matching", scheduler, latents, generator, offset).target

    shift = target(0.1) - target(0.0)  # flow matching's target is noise - latents
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(shift, per_channel.expand_as(shift), rtol=0, atol=1e-6)
    assert per_channel.abs().max() > 1e-3


# --- caches -------------------------------------------------------------------------------------


def test_cached_latents_and_embeddings_give_the_same_losses(tmp_path, dataset):
    cached = make_trainer(tmp_path / "cached", dataset, cache_latents=True)
    fresh = make_trainer(
        tmp_path / "fresh", dataset, cache_latents=False, cache_text_embeddings=False
    )
    assert train(cached, 3) == pytest.approx(train(fresh, 3), rel=1e-6)
    assert cached.latent_cache and cached.prompt_cache
    assert not fresh.latent_cache and not fresh.prompt_cache


# --- learning-rate schedule ---------------------------------------------------------------------


def _lr_curve(scheduler: str, steps: int = 20, warmup: int = 4, cycles: int = 1) -> list[float]:
    config = TrainConfig(
        learning_rate=1.0, lr_scheduler=scheduler, lr_warmup_steps=warmup, lr_num_cycles=cycles
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    schedule = make_scheduler(config, optimizer, steps)
    curve = []
    for _ in range(steps + 1):
        curve.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return curve  # curve[k]: the lr of step k + 1


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "cosine_with_restarts"])
def test_every_schedule_warms_up_linearly(scheduler):
    curve = _lr_curve(scheduler)
    assert curve[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_schedule_shapes_after_warmup():
    constant, linear = _lr_curve("constant"), _lr_curve("linear")
    cosine, restarts = _lr_curve("cosine"), _lr_curve("cosine_with_restarts", cycles=2)
    assert constant[4:] == pytest.approx([1.0] * 17)
    assert (linear[12], linear[16], linear[20]) == pytest.approx((0.5, 0.25, 0.0))
    assert (cosine[8], cosine[12], cosine[20]) == pytest.approx(
        (0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0)
    )
    # Two cycles over the 16 steps after warmup: down to ~0 at step 12, back to the peak.
    assert (restarts[8], restarts[11], restarts[12]) == pytest.approx(
        (0.5, 0.5 * (1 + math.cos(math.pi * 7 / 8)), 1.0)
    )
    assert _lr_curve("constant", warmup=0) == pytest.approx([1.0] * 21)
