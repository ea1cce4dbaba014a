"""The pipeline check behind a replica's health (deployments/replica_health.py over
base_guard.py), without Ray: what it finds, what it must not mistake for a change (an adapter
fused into the base weights, LyCORIS deltas), and that it never waits out a render. The
replacement by Serve is tests/test_replica_health.py.

Each test builds its own tiny Flux pipeline: some break it on purpose."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.errors import PipelineBroken, ReplicaUnavailable
from deployments.family import get_family
from deployments.loras.synthetic import lora_tensors
from deployments.replica_health import (
    CHECK_WAIT_S,
    CORRUPT_AFTER_ENV,
    FAULT_MARKER_ENV,
    ReplicaHealth,
)
from tests.lora_formats import lora_in_format
from tests.test_lora_kinds import lycoris_file


@pytest.fixture
def flux() -> PipelineAdapters:
    family = get_family("flux")
    return PipelineAdapters(family.build_tiny(), family, fuse_single=True, max_adapters=4)


@pytest.fixture
def tensor_thread():
    executor = ThreadPoolExecutor(max_workers=1)
    yield executor
    executor.shutdown(wait=True)


def check(health: ReplicaHealth) -> None:
    asyncio.run(health.check())


def test_fused_and_lycoris_adapters_are_not_changes_but_the_check_sees_past_them(flux):
    """Fusion and LoKr write into the base weights while active: the check compares the base
    values they keep aside. Without them it would fail every replica serving one adapter."""
    pipe = flux.pipe
    kohya, _ = lora_in_format(pipe, "flux", "kohya", seed=3)
    flux.load("lora", lora_tensors(pipe.transformer, "transformer", 1), "lora")
    flux.load("ly", lycoris_file(kohya, "LoKr", seed=4), "ly")
    for stack in (["lora"], ["ly"], ["lora", "ly"]):
        flux.activate([ActiveAdapter(name, 1.0, 1.0) for name in stack])
        assert flux.guard.changes(flux.activation.base_values()) == [], stack
        assert flux.guard.changes() != [], f"{stack}: nothing was written into base weights"
    flux.activate([ActiveAdapter("lora", 1.0, 1.0)])
    with torch.no_grad():  # the kept base values themselves overwritten: found
        flux.activation.fused[0][1].add_(1.0)
    assert flux.guard.changes(flux.activation.base_values()) == [
        "base weights were overwritten in place"
    ]
    flux.activate([])
    assert flux.guard.changes() == ["base weights were overwritten in place"]


@pytest.mark.parametrize("fault", ["in_place", "new_values", "module", "config", "text_encoder"])
def test_each_kind_of_change_is_found(flux, fault):
    pipe = flux.pipe
    transformer = pipe.transformer
    with torch.no_grad():
        if fault == "in_place":
            transformer.norm_out.linear.weight.mul_(2)
        elif fault == "new_values":  # same parameter object, its values moved elsewhere
            weight = transformer.proj_out.weight
            weight.data = weight.data.clone()
        elif fault == "module":
            block = transformer.transformer_blocks[0]
            block.attn.to_q = torch.nn.Linear(block.attn.to_q.in_features, 8)
        elif fault == "config":
            transformer.register_to_config(in_channels=99)
        else:
            pipe.text_encoder.final_layer_norm.bias.add_(0.5)
    expected = {
        "in_place": "base weights were overwritten in place",
        "new_values": "transformer.proj_out.weight holds other values",
        "module": "transformer.transformer_blocks.0.attn.to_q was replaced",
        "config": "transformer.config.in_channels changed",
        "text_encoder": "base weights were overwritten in place",
    }[fault]
    assert flux.guard.changes() == [expected]


@pytest.mark.parametrize("found_by", ["health_check", "render"])
def test_a_change_fails_the_check_and_every_render_after_it(flux, tensor_thread, found_by):
    health = ReplicaHealth(flux, tensor_thread)
    check(health)
    health.before_render()
    assert health.last_check_ms is not None
    with torch.no_grad():
        flux.pipe.transformer.x_embedder.weight.add_(1.0)
    with pytest.raises(PipelineBroken) as failed:
        check(health) if found_by == "health_check" else health.before_render()
    assert isinstance(failed.value, ReplicaUnavailable)  # 503 with Retry-After at the ingress
    assert failed.value.message == (
        "this replica's pipeline is not the model it loaded (the base model changed outside "
        "any load: base weights were overwritten in place); Serve is replacing the replica: "
        "retry shortly"
    )
    with pytest.raises(PipelineBroken):
        health.before_render()
    with pytest.raises(PipelineBroken):  # and it stays failed
        check(health)


def test_the_check_never_waits_out_a_render_holding_the_tensor_thread(flux, tensor_thread):
    """A render longer than Serve's timeout must not fail a sound replica: the check answers
    from the last comparison and reads the pending one at the next call."""
    health = ReplicaHealth(flux, tensor_thread)
    render = threading.Event()
    tensor_thread.submit(render.wait)
    with torch.no_grad():  # broken during the render: seen once the thread is free
        flux.pipe.transformer.x_embedder.weight.add_(1.0)
    started = time.monotonic()
    check(health)
    assert time.monotonic() - started < CHECK_WAIT_S + 0.5
    render.set()
    deadline = time.monotonic() + 10
    with pytest.raises(PipelineBroken):
        while time.monotonic() < deadline:
            check(health)


def test_the_fault_hook_corrupts_once_per_marker_after_n_renders(
    flux, tensor_thread, tmp_path, monkeypatch
):
    monkeypatch.setenv(CORRUPT_AFTER_ENV, "2")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path / "corrupted"))
    health = ReplicaHealth(flux, tensor_thread)
    health.before_render()
    health.before_render()
    assert flux.guard.changes() == []
    with pytest.raises(PipelineBroken):  # the third render: corrupted, and found, before it
        health.before_render()
    assert flux.guard.changes() == ["base weights were overwritten in place"]
    assert (tmp_path / "corrupted").exists()

    family = get_family("flux")  # a replacement with the same environment stays sound
    again = PipelineAdapters(family.build_tiny(), family)
    replacement = ReplicaHealth(again, tensor_thread)
    for _ in range(4):
        replacement.before_render()
    assert again.guard.changes() == []
