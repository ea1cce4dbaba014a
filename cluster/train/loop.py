"""The per-worker training loop that Ray Train runs on every worker.

Data parallel: each worker trains the same LoRA on its share of every global batch, and the
LoRA's gradients are averaged across workers before each optimizer step. Everything random in a
step (which images, caption dropout, noise, timesteps) is drawn from generators seeded by the
seed and the step, so a run resumed from a checkpoint repeats what an uninterrupted run does.
"""

from __future__ import annotations

import math
import os
import random
import resource
import sys
import tempfile
import time
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from cluster.train import progress
from cluster.train.config import RunStatus, TrainJob
from cluster.train.data import StepOrder, load_images
from cluster.train.loop_config import CRASH_RANK
from cluster.train.lora_setup import (
    add_lora,
    load_lora_tensors,
    lora_tensors,
    make_optimizer,
    make_scheduler,
)
from cluster.train.objectives import noise_batch
from cluster.train.publish import adapter_metadata
from deployments import load_pipeline
from deployments.family import get_family
from deployments.schemas import GenerationJob

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.pt"
VALIDATION_SEED = 2**31 - 1
VALIDATION_IMAGES = 4
STATUS_INTERVAL_S = 1.0


def _step_generator(seed: int, *parts: int) -> torch.Generator:
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class Trainer:
    """One worker's state: the pipeline with its LoRA, the data, the optimizer."""

    def __init__(self, loop_config: dict[str, Any], rank_and_world: tuple[int, int] | None = None):
        """`rank_and_world`: None under Ray Train (read from its context); (0, 1) to run one
        worker's loop in-process, as the knob tests do."""
        self.job = TrainJob.model_validate(loop_config["job"])
        self.config = self.job.config
        self.total_steps: int = loop_config["total_steps"]
        self.run_dir: str = loop_config["run_dir"]
        self.dataset_hash: str = loop_config["dataset_hash"]
        self.crash_at_step: int | None = loop_config.get("crash_at_step")
        self.crash_marker: str | None = loop_config.get("crash_marker")
        if rank_and_world is None:
            context = ray.train.get_context()
            rank_and_world = context.get_world_rank(), context.get_world_size()
        self.rank, self.world = rank_and_world
        self.family = get_family(self.job.base_model)
        self.spec = self.family.training
        self.device = "cuda" if self.config.use_gpu and torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(self.job.base_model, self.job.model_uri, device=self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.components = add_lora(self.pipe, self.family, self.config)
        self.denoiser = getattr(self.pipe, self.family.denoiser_component)
        if self.config.gradient_checkpointing and self.denoiser._supports_gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.params = [
            p
            for name in self.components
            for p in getattr(self.pipe, name).parameters()
            if p.requires_grad
        ]
        self.optimizer = make_optimizer(self.config, self.params)
        self.scheduler = make_scheduler(self.config, self.optimizer, self.total_steps)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(
            self.device, enabled=self.config.mixed_precision == "fp16"
        )
        self.samples = load_images(self.job)
        self.order = StepOrder(
            [s.bucket for s in self.samples],
            self.config.batch_size,
            self.world,
            self.config.repeats,
            self.config.seed,
        )
        self.latent_cache: dict[int, torch.Tensor] = {}
        self.prompt_cache: dict[str, dict[str, Any]] = {}
        self.step = 0
        self.losses: list[float] = []
        self.sample_files: list[str] = []
        self.validation: dict[str, float] = {}
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.config.mixed_precision
        )

    # --- inputs -------------------------------------------------------------------------------

    def latents(self, indices: list[int]) -> torch.Tensor:
        out = []
        for index in indices:
            cached = self.latent_cache.get(index)
            if cached is None:
                pixels = self.samples[index].pixels.unsqueeze(0).to(self.device)
                with torch.no_grad():
                    cached = self.spec.encode_images(self.pipe, pixels)[0]
                if self.config.cache_latents:
                    self.latent_cache[index] = cached
            out.append(cached)
        return torch.stack(out)

    def conditionings(self, captions: list[str]) -> list[dict[str, Any]]:
        if self.config.train_text_encoder:  # the text encoder changes: encode every time
            return self.spec.encode_prompts(self.pipe, captions)
        if not self.config.cache_text_embeddings:
            with torch.no_grad():
                return self.spec.encode_prompts(self.pipe, captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.prompt_cache]
        if missing:
            with torch.no_grad():
                for caption, cond in zip(
                    missing, self.spec.encode_prompts(self.pipe, missing), strict=True
                ):
                    self.prompt_cache[caption] = cond
        return [self.prompt_cache[c] for c in captions]

    def loss_of(self, indices: list[int], captions: list[str], generator: torch.Generator):
        latents = self.latents(indices)
        batch = noise_batch(
            self.spec.objective, self.pipe.scheduler, latents, generator, self.config.noise_offset
        )
        conds = self.conditionings(captions)
        with torch.autocast(
            self.device,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            prediction = self.spec.predict(self.pipe, batch.noisy, batch.timesteps, conds)
        return torch.nn.functional.mse_loss(prediction.float(), batch.target.float())

    def validation_loss(self) -> float:
        """The loss on a fixed batch (the first images of the first bucket, fixed noise and
        timesteps): comparable between steps, unlike the training loss."""
        first = self.samples[0].bucket
        indices = [i for i, s in enumerate(self.samples) if s.bucket == first][:VALIDATION_IMAGES]
        captions = [self.samples[i].caption for i in indices]
        with torch.no_grad():
            loss = self.loss_of(indices, captions, torch.Generator().manual_seed(VALIDATION_SEED))
        return float(loss)

    # --- one step -----------------------------------------------------------------------------

    def train_step(self) -> float:
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(config.gradient_accumulation_steps):
            micro = self.step * config.gradient_accumulation_steps + k
            indices = self.order.batch(micro, self.rank)
            drop = random.Random(config.seed * 7919 + micro * 131 + self.rank)
            captions = [
                "" if drop.random() < config.caption_dropout else self.samples[i].caption
                for i in indices
            ]
            generator = _step_generator(config.seed, micro, self.rank)
            loss = self.loss_of(indices, captions, generator) / config.gradient_accumulation_steps
            self.scaler.scale(loss).backward()
            total += loss.item()
        # Averaged while still scaled: an inf on any worker reaches every worker, so all of
        # them skip the same fp16 step. Without fp16 the scaler passes everything through.
        self.average_gradients()
        self.scaler.unscale_(self.optimizer)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.world > 1:
            reduced = torch.tensor([total])
            dist.all_reduce(reduced)
            total = float(reduced) / self.world
        return total

    def average_gradients(self) -> None:
        """All-reduce the LoRA gradients. Done by hand rather than by wrapping the denoiser in
        DDP: the family's `predict` calls the model through the pipeline's own attribute."""
        if self.world == 1:
            return
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        # One flat all-reduce, not one per layer: a LoRA has hundreds of small tensors.
        flat = torch.cat([param.grad.reshape(-1) for param in self.params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for param in self.params:
            count = param.grad.numel()
            param.grad.copy_(flat[offset : offset + count].view_as(param.grad))
            offset += count

    # --- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, folder: str) -> None:
        metadata = adapter_metadata(self.job, self.step, self.dataset_hash, self.components)
        save_file(
            lora_tensors(self.pipe, self.components), os.path.join(folder, ADAPTER_FILE), metadata
        )
        torch.save(
            {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "losses": self.losses,
                "samples": self.sample_files,
                "validation": self.validation,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
            },
            os.path.join(folder, STATE_FILE),
        )

    def restore(self, checkpoint: ray.train.Checkpoint) -> None:
        with checkpoint.as_directory() as folder:
            load_lora_tensors(
                self.pipe, self.components, load_file(os.path.join(folder, ADAPTER_FILE))
            )
            state = torch.load(os.path.join(folder, STATE_FILE), weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:  # checkpoints from before fp16 loss scaling lack it
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.losses = state["losses"]
        self.sample_files = state["samples"]
        self.validation = state["validation"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def report(self, metrics: dict[str, Any], with_checkpoint: bool) -> None:
        if with_checkpoint and self.rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                self.save_checkpoint(folder)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)

    # --- what rank 0 shows --------------------------------------------------------------------

    def write_samples(self) -> None:
        for index, prompt in enumerate(self.config.sample_prompts):
            defaults = self.family.defaults
            job = GenerationJob(
                prompt=prompt,
                negative_prompt="",
                width=self.config.resolution,
                height=self.config.resolution,
                steps=defaults.steps,
                cfg=defaults.cfg,
                seed=self.config.seed,
                adapters=[],
                # A video family samples one frame: what it trains on, not a whole clip.
                length=1 if self.family.output == "video" else None,
            )
            generator = torch.Generator(self.device).manual_seed(self.config.seed + index)
            with torch.no_grad():
                result = self.pipe(
                    **self.family.pipeline_kwargs(job), generator=generator, output_type="pil"
                )  # video pipelines return arrays by default
            image = result.frames[0][0] if self.family.output == "video" else result.images[0]
            self.sample_files.append(progress.write_sample(self.run_dir, self.step, index, image))

    def status(self, started_s: float, start_step: int, peak_rss_mb: list[float]) -> RunStatus:
        elapsed = time.monotonic() - started_s
        done = self.step - start_step
        rate = done / elapsed if done and elapsed > 0 else None
        return RunStatus(
            state="RUNNING",
            step=self.step,
            total_steps=self.total_steps,
            loss=self.losses[-1] if self.losses else None,
            lr=self.scheduler.get_last_lr()[0],
            steps_per_s=rate,
            eta_s=(self.total_steps - self.step) / rate if rate else None,
            checkpoints=progress.list_checkpoints(self.run_dir),
            samples=list(self.sample_files),
            initial_validation_loss=self.validation.get("initial"),
            validation_loss=self.validation.get("last"),
            peak_rss_mb=peak_rss_mb,
            workers=self.world,
        )

    def peak_rss_mb(self) -> list[float]:
        """Every worker's peak resident memory, in MiB (ru_maxrss is KiB on Linux)."""
        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.world == 1:
            return [round(mine, 1)]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, round(mine, 1))
        return gathered

    def maybe_crash(self) -> None:
        if self.crash_at_step != self.step or self.rank != CRASH_RANK % self.world:
            return
        if self.crash_marker and not os.path.exists(self.crash_marker):
            with open(self.crash_marker, "w") as marker:
                marker.write(str(self.step))
            os._exit(1)

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            self.restore(checkpoint)
            print(f"[loraplex] rank {self.rank}: resumed at step {self.step}", flush=True)
        elif self.rank == 0:
            self.validation["initial"] = self.validation_loss()
        start_step, started_s, last_status_s = self.step, time.monotonic(), 0.0
        rss = self.peak_rss_mb()
        bar = None
        if self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                file=sys.stdout,
                mininterval=1.0,
                desc=f"train {self.job.output_file}",
                dynamic_ncols=False,
                ncols=100,
            )
        config = self.config
        while self.step < self.total_steps:
            loss = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step + 1}")
            self.step += 1
            self.losses.append(loss)
            final = self.step == self.total_steps
            if final and self.rank == 0:
                self.validation["last"] = self.validation_loss()
            sample_due = config.sample_every and self.step % config.sample_every == 0
            if self.rank == 0 and (sample_due or (final and config.sample_prompts)):
                self.write_samples()
            checkpoint_due = self.step % config.save_every == 0 or final
            if checkpoint_due:
                rss = self.peak_rss_mb()  # a collective: every worker calls it at the same steps
            status_due = time.monotonic() - last_status_s >= STATUS_INTERVAL_S
            if self.rank == 0 and (checkpoint_due or status_due):
                last_status_s = time.monotonic()
                progress.write_status(self.run_dir, self.status(started_s, start_step, rss))
                progress.write_loss_curve(self.run_dir, self.losses)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                bar.update(1)
            if checkpoint_due:
                metrics = {
                    "step": self.step,
                    "loss": loss,
                    **{f"validation_{k}": v for k, v in self.validation.items()},
                }
                self.report(metrics, with_checkpoint=True)
            self.maybe_crash()
        if bar is not None:
            bar.close()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    torch.set_num_threads(max(1, loop_config.get("threads_per_worker", 1)))
    Trainer(loop_config).run()
