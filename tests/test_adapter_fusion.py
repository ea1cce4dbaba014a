"""fuse_single_adapter: one active adapter added into the denoiser's weights, and taken out
again bit for bit (a tiny Flux pipeline of its own, so no other test sees its weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments import load_pipeline
from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.family import get_family
from tests.lora_files import lora_tensors

SMALL = {"width": 128, "height": 128, "num_inference_steps": 2}
# Fused (x @ (W + BA)) vs unfused (x @ W + B(A x)): the same sums in another order; measured
# max abs pixel difference (floats in [0, 1]) on the tiny model: below 1e-5.
FUSION_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("flux", "tiny://flux")


def image(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        out = pipe(prompt="a red fox", generator=generator, output_type="np", **SMALL)
    return out.images[0]


def weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}


def test_fused_adapter_matches_unfused_and_unfuses_exactly(pipe):
    tensors = {
        name: lora_tensors(pipe.transformer, "transformer", seed)
        for name, seed in (("a", 1), ("b", 2))
    }
    base = image(pipe)
    adapters = PipelineAdapters(pipe, get_family("flux"), fuse_single=False)
    adapters.load("a", tensors["a"], "a")
    adapters.load("b", tensors["b"], "b")
    adapters.activate([])
    base_weights = weights(pipe)
    adapters.activate([ActiveAdapter("a", 0.8, 1.0)])
    unfused = image(pipe)

    adapters.fuse_single = True
    adapters.activate([])
    adapters.activate([ActiveAdapter("a", 0.8, 1.0)])
    assert adapters.activation.fused, "nothing was fused"
    fused = image(pipe)
    assert np.abs(fused - unfused).max() < FUSION_TOLERANCE
    assert np.abs(fused - base).max() > 0.01, "the adapter changes nothing"

    # Another adapter, a stack (never fused), then none: the base, bit for bit.
    adapters.activate([ActiveAdapter("b", 1.0, 1.0)])
    adapters.activate([ActiveAdapter("a", 0.8, 1.0), ActiveAdapter("b", 0.5, 1.0)])
    assert not adapters.activation.fused
    adapters.activate([ActiveAdapter("a", 0.8, 1.0)])
    np.testing.assert_array_equal(image(pipe), fused)
    adapters.activate([])
    for name, tensor in weights(pipe).items():
        assert torch.equal(tensor, base_weights[name]), name
    np.testing.assert_array_equal(image(pipe), base)

    # Deleting the fused adapter restores the weights first.
    adapters.activate([ActiveAdapter("a", 0.8, 1.0)])
    adapters.delete("a")
    adapters.delete("b")
    adapters.activate([])
    np.testing.assert_array_equal(image(pipe), base)
