"""Model calls shared by several families' training specs (see `TrainingSpec` in family.py)."""

from __future__ import annotations

from typing import Any

import torch


def vae_encode(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised latents of images in [-1, 1]: the distribution's mode, so cached and fresh
    latents are the same tensor; shifted and scaled as the pipeline undoes before decoding."""
    vae = pipe.vae
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def split_batch(tensors: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """One dict per sample from batched tensors: those with a batch dimension are indexed,
    the rest (shared position ids) are kept whole."""
    out = []
    for i in range(count):
        item = {}
        for name, value in tensors.items():
            batched = isinstance(value, torch.Tensor) and value.ndim > 0
            item[name] = value[i] if batched and value.shape[0] == count else value
        out.append(item)
    return out


def frame_vae_encode(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised latents of images in [-1, 1] through a video VAE (Qwen-Image's, Wan's): each
    image is a one-frame video, and the latents are normalised per channel by the VAE's
    `latents_mean` / `latents_std`, as the pipelines undo before decoding. BCHW in, BCHW out."""
    vae = pipe.vae
    latents = vae.encode(pixels.to(vae.dtype).unsqueeze(2)).latent_dist.mode()
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
    return ((latents - mean) / std).squeeze(2)
