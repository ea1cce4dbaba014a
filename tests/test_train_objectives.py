"""The training targets each objective gives, on real diffusers schedulers."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from cluster.train.objectives import noise_batch


def _latents() -> torch.Tensor:
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_target_follows_the_schedulers_prediction_type(prediction_type):
    scheduler = EulerDiscreteScheduler(prediction_type=prediction_type)
    latents = _latents()
    batch = noise_batch("epsilon", scheduler, latents, torch.Generator().manual_seed(0))
    # The same draws again: the noise the batch used.
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator)
    alphas = scheduler.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(batch.noisy, alphas.sqrt() * latents + (1 - alphas).sqrt() * noise)
    if prediction_type == "epsilon":
        expected = noise
    else:
        expected = alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    assert torch.allclose(batch.target, expected, atol=1e-6)


@pytest.mark.parametrize(
    "scheduler",
    [
        FlowMatchEulerDiscreteScheduler(shift=3.0),
        UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
    ],
    ids=["shift", "flow_shift"],
)
def test_flow_matching_interpolates_and_shifts_like_the_scheduler(scheduler):
    latents = _latents()
    batch = noise_batch("flow_matching", scheduler, latents, torch.Generator().manual_seed(0))
    s = batch.timesteps.view(-1, 1, 1, 1)
    noise = batch.target + latents
    assert torch.allclose(batch.noisy, (1 - s) * latents + s * noise, atol=1e-6)
    # Shift 3 (Wan's UniPC calls it flow_shift) moves sigmas towards noise: s = 3u / (1 + 2u).
    generator = torch.Generator().manual_seed(0)
    torch.randn(latents.shape, generator=generator)
    u = torch.sigmoid(torch.randn((2,), generator=generator))
    assert torch.allclose(batch.timesteps, 3 * u / (1 + 2 * u), atol=1e-6)
