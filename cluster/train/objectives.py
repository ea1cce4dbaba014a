"""The training objectives: noise, timesteps and the target for one batch of latents.

Family-agnostic: what differs per model (how the denoiser is called) is in the family's
`TrainingSpec`; what differs per schedule is read from the pipeline's scheduler config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler


@dataclass
class NoisedBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    """Flow matching: sigma in [0, 1]; DDPM: the integer step in [0, num_train_timesteps)."""
    target: torch.Tensor


def noise_batch(
    objective: str,
    scheduler,
    latents: torch.Tensor,
    generator: torch.Generator,
    noise_offset: float = 0.0,
) -> NoisedBatch:
    """Noise `latents` at random timesteps drawn from `generator` (so a step's draw depends only
    on its seed, which makes a resumed run draw what an uninterrupted one would)."""
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        # A per-channel constant shift, so the model learns to change overall brightness.
        offset = torch.randn((batch, latents.shape[1], 1, 1), generator=generator)
        noise = noise + noise_offset * offset
    noise = noise.to(latents.device, latents.dtype)
    if objective == "flow_matching":
        u = torch.sigmoid(torch.randn((batch,), generator=generator))  # logit-normal, as SD3
        sigmas = _shifted_sigmas(scheduler.config, u, latents).to(latents.device, latents.dtype)
        s = sigmas.view(batch, 1, 1, 1)
        return NoisedBatch((1 - s) * latents + s * noise, sigmas, noise - latents)
    # The DDPM forward process of the model's noise schedule (its inference scheduler's betas),
    # as diffusers' own training scripts build it.
    scheduler = DDPMScheduler.from_config(scheduler.config)
    steps = int(scheduler.config.num_train_timesteps)
    timesteps = torch.randint(0, steps, (batch,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    # A model's scheduler says what it predicts (SDXL base: epsilon; v-prediction fine-tunes of
    # SDXL ship `prediction_type: v_prediction`); the family's objective is the default.
    objective = scheduler.config.get("prediction_type") or objective
    if objective == "epsilon":
        return NoisedBatch(noisy, timesteps, noise)
    if objective == "v_prediction":
        return NoisedBatch(noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps))
    raise ValueError(f"unknown objective {objective!r}")


def _shifted_sigmas(config, u: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The scheduler's timestep shift applied to uniform-ish u: a fixed `shift`, or the
    resolution-dependent one (mu from the image's token count, 2x2 patches) where the
    scheduler uses dynamic shifting, as the pipeline does at inference."""
    if config.get("use_dynamic_shifting"):
        tokens = latents.shape[-2] * latents.shape[-1] / 4
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len")
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (max_shift - base_shift) / ((max_len or 4096) - base_len)
        mu = base_shift + slope * (tokens - base_len)
        return math.exp(mu) / (math.exp(mu) + (1 / u.clamp(1e-6, 1) - 1))
    # FlowMatchEuler calls it `shift`; UniPC in flow mode (Wan) calls it `flow_shift`.
    shift = float(config.get("shift", config.get("flow_shift") or 1.0))
    return shift * u / (1 + (shift - 1) * u)
