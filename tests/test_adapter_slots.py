"""Free slots: an evicted adapter's layers refilled in place by the next adapter that fits them.

A recycled slot must give the bytes of a fresh load of the same file; anything that does not
fit a slot exactly loads freshly; a failed load leaves the slots as they were; and the layers
held stay bounded over many evictions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.errors import LoraIncompatible
from deployments.family import get_family
from deployments.loras.files import parse_lora_file
from tests.adapter_helpers import (
    CLIP_TARGETS,
    adapter_state,
    fresh_image,
    image,
    kohya_flux,
    loaded,
    lora_parameters,
    on,
    same_state,
    with_adapters,
)
from tests.lora_files import lora_tensors, write_lora

MAX_ADAPTERS = 2


@pytest.fixture(scope="module")
def pipe(tiny_pipelines):
    return tiny_pipelines("flux")


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    """Adapters as the service reads them (through .safetensors files), made from the bare
    model: transformer and CLIP text-encoder keys, a partial one, another rank."""
    folder = tmp_path_factory.mktemp("slots")

    def made(name: str, seed: int, rank: int = 4, clip: bool = True, targets=None) -> dict:
        tensors = lora_tensors(pipe.transformer, "transformer", seed, rank)
        if targets is not None:
            tensors = lora_tensors(pipe.transformer, "transformer", seed, rank, targets)
        if clip:
            tensors |= lora_tensors(
                pipe.text_encoder, "text_encoder", seed + 100, rank, CLIP_TARGETS
            )
        path = write_lora(folder / f"{name}.safetensors", tensors)
        return parse_lora_file(path.read_bytes(), path.name)[0]

    return {
        "a": made("a", 1),
        "b": made("b", 2),
        "c": made("c", 3),
        "partial": made("partial", 4, targets=("to_q", "to_k")),
        "rank8": made("rank8", 5, rank=8),
        "no_clip": made("no_clip", 6, clip=False),
    }


@pytest.fixture(scope="module")
def base(pipe, files):
    return image(pipe)


@pytest.fixture
def adapters(pipe, files, base):
    """PipelineAdapters with free slots, on the shared pipeline; all adapters deleted after."""
    adapters = PipelineAdapters(pipe, get_family("flux"), max_adapters=MAX_ADAPTERS)
    yield adapters
    for name in loaded(pipe):
        adapters.delete(name)


@pytest.mark.parametrize("fuse", [False, True])
def test_a_recycled_slot_gives_the_bytes_of_a_fresh_load(pipe, files, base, fuse):
    adapters = PipelineAdapters(pipe, get_family("flux"), fuse, max_adapters=MAX_ADAPTERS)
    first, _ = adapters.load_reusing(files["a"], "a")
    with_adapters(adapters, on(first, 0.6, 0.8))  # leaves scales (and fused weights) behind
    adapters.release(first)
    assert adapters.free_slots() == [first] and adapters.free_slot_count() == 1
    slot, layers = adapters.load_reusing(files["b"], "b")
    assert slot == first and adapters.free_slots() == [] and adapters.free_slot_count() == 0
    assert layers == len(files["b"]) // 2
    assert adapters.fresh_loads == 1  # the first load only: the second refilled its slot
    recycled = [with_adapters(adapters, on(slot, *s)) for s in ((1.0, 1.0), (0.5, 0.7))]
    zero = with_adapters(adapters, on(slot, 0.0, 0.0))
    after = with_adapters(adapters)
    adapters.delete(slot)
    assert np.array_equal(zero, base)
    assert np.array_equal(after, base)
    fresh = fresh_image(pipe, files["b"], (1.0, 1.0), (0.5, 0.7), fuse=fuse)
    assert np.abs(recycled[0] - base).mean() > 0.01
    for got, want in zip(recycled, fresh, strict=True):
        assert np.array_equal(got, want)


def test_recycled_slot_stacks_with_another_adapter_and_block_weights(adapters, pipe, files):
    hot, _ = adapters.load_reusing(files["a"], "a")
    evicted, _ = adapters.load_reusing(files["b"], "b")
    adapters.release(evicted)
    slot, _ = adapters.load_reusing(files["c"], "c")
    assert slot == evicted
    scales = adapters.block_scales({"transformer_blocks": 0.0}, "block_weights")
    both = with_adapters(adapters, on(hot, 0.7), on(slot, 0.9))
    blocks = with_adapters(adapters, ActiveAdapter(slot, 1.0, 1.0, scales))
    for name in loaded(pipe):
        adapters.delete(name)
    fresh = PipelineAdapters(pipe, get_family("flux"))
    fresh.load("a", files["a"], "a")
    fresh.load("c", files["c"], "c")
    assert np.array_equal(with_adapters(fresh, on("a", 0.7), on("c", 0.9)), both)
    assert np.array_equal(with_adapters(fresh, ActiveAdapter("c", 1.0, 1.0, scales)), blocks)


@pytest.mark.parametrize("other", ["partial", "rank8", "no_clip"])
def test_an_adapter_that_does_not_fit_the_slot_exactly_loads_freshly(adapters, pipe, files, other):
    hot, _ = adapters.load_reusing(files["b"], "b")
    evicted, _ = adapters.load_reusing(files["a"], "a")
    adapters.release(evicted)
    name, layers = adapters.load_reusing(files[other], other)
    assert name not in (hot, evicted)
    assert layers == len(files[other]) // 2
    # The fresh load went over the bound by one: the free slot is gone, not its weights reused.
    assert loaded(pipe) == {hot, name} and adapters.free_slots() == []
    got = with_adapters(adapters, on(name))
    assert np.array_equal(got, fresh_image(pipe, files[other], (1.0, 1.0))[0])


def test_a_slot_takes_only_what_a_fresh_load_would_make_plain(adapters, pipe, files):
    # kohya-style `.alpha` tensors become per-module scales in diffusers: loaded freshly.
    alpha = dict(files["a"])
    for key in [k for k in alpha if k.endswith(".lora_A.weight")]:
        alpha[key.removesuffix(".lora_A.weight") + ".alpha"] = torch.tensor(2.0)
    evicted, _ = adapters.load_reusing(files["b"], "b")
    adapters.release(evicted)
    assert adapters._slot_layout(alpha) is None
    assert adapters._slot_layout(files["a"]) is not None
    # A DoRA adapter never becomes a slot, and a DoRA file never fills one.
    dora = dict(files["no_clip"])
    for key in [k for k in dora if k.endswith(".lora_B.weight")]:
        stem = key.removesuffix(".lora_B.weight")
        dora[f"{stem}.lora_magnitude_vector"] = torch.ones(dora[key].shape[0])
    assert adapters._slot_layout(dora) is None
    name, _ = adapters.load_reusing(dora, "dora")
    assert name != evicted
    adapters.release(name)
    assert name not in loaded(pipe) and adapters.free_slots() == [evicted]


def test_a_failed_load_leaves_the_slot_and_the_images_as_they_were(adapters, pipe, files, base):
    hot, _ = adapters.load_reusing(files["a"], "a")
    evicted, _ = adapters.load_reusing(files["b"], "b")
    adapters.release(evicted)
    before = with_adapters(adapters, on(hot))
    state = (loaded(pipe), adapters.free_slots(), lora_parameters(pipe))
    # lora_B of rank 8 over lora_A of rank 4. (Not a wider lora_A: diffusers' Flux loader widens
    # the base layers for those before it fails, which the replica's check refuses first.)
    ranks_differ = {
        key: torch.cat([t, t], dim=1) if key.endswith(".lora_B.weight") else t
        for key, t in files["c"].items()
    }
    no_module = {"transformer.nowhere.lora_A.weight": torch.zeros(4, 8)} | {
        "transformer.nowhere.lora_B.weight": torch.zeros(8, 4)
    }
    for bad in (ranks_differ, no_module):
        with pytest.raises(LoraIncompatible, match="Failed to load LoRA: bad: "):
            adapters.load_reusing(bad, "bad")
        assert (loaded(pipe), adapters.free_slots(), lora_parameters(pipe)) == state
        assert np.array_equal(with_adapters(adapters, on(hot)), before)
        assert np.array_equal(with_adapters(adapters), base)
    # The slot still fills exactly.
    slot, _ = adapters.load_reusing(files["c"], "c")
    assert slot == evicted
    got = with_adapters(adapters, on(slot))
    assert np.array_equal(got, fresh_image(pipe, files["c"], (1.0, 1.0))[0])


def test_eviction_cycles_keep_the_layers_bounded(adapters, pipe, files):
    """An LRU of MAX_ADAPTERS as Serve keeps it: evict the oldest, then load the next."""
    order = ["a", "b", "partial", "c", "rank8", "a", "no_clip", "b", "c", "partial"] * 2
    hot = [adapters.load_reusing(files[name], name)[0] for name in order[:MAX_ADAPTERS]]
    parameters = []
    reused = 0
    for name in order[MAX_ADAPTERS:]:
        adapters.release(hot.pop(0))
        free = adapters.free_slots()
        adapter_name, _ = adapters.load_reusing(files[name], name)
        reused += adapter_name in free
        hot.append(adapter_name)
        assert len(loaded(pipe)) <= MAX_ADAPTERS
        assert set(hot) <= loaded(pipe)
        parameters.append(lora_parameters(pipe))
    assert reused >= 5  # a, b and c share one signature
    assert max(parameters) <= 2 * lora_parameters_of(files["rank8"])


def lora_parameters_of(tensors: dict) -> int:
    return sum(t.numel() for t in tensors.values())


def test_the_service_reloads_an_evicted_adapter_into_a_slot_to_the_same_bytes(service):
    """Three adapters of one layout through a replica's LRU of two: every reload after the
    first two lands in an evicted adapter's slot."""

    def generate(lora_id: str):
        response = service.post(
            "/flux-lora",
            json={
                "prompt": "a lighthouse",
                "seed": 3,
                "width": 64,
                "height": 64,
                "steps": 2,
                "lora_id": lora_id,
            },
        )
        assert response.status_code == 200, response.text
        return response

    first = {lora_id: generate(lora_id).content for lora_id in ("g", "h", "k")}
    for lora_id in ("g", "h", "k", "g"):
        again = generate(lora_id)
        assert again.headers["X-LoRA-Cache"] == "miss", (lora_id, service.get("/models").text)
        assert again.content == first[lora_id]
    [flux] = [m for m in service.get("/models").json()["models"] if m["name"] == "flux"]
    [replica] = flux["replicas"]
    assert len(replica["hot_adapters"]) <= 2


@pytest.mark.parametrize("family", ["sdxl", "qwen_image", "z_image", "wan"])
def test_every_family_refills_a_slot_to_the_state_of_a_fresh_load(tiny_pipelines, family):
    spec = get_family(family)
    pipe = tiny_pipelines(family)
    denoiser = getattr(pipe, spec.denoiser_component)
    first, second = (
        lora_tensors(denoiser, spec.denoiser_component, seed, targets=spec.lora_targets)
        for seed in (21, 22)
    )
    adapters = PipelineAdapters(pipe, spec, max_adapters=1)
    try:
        evicted, _ = adapters.load_reusing(first, "first")
        adapters.activate([on(evicted, 0.5)])
        adapters.release(evicted)
        slot, layers = adapters.load_reusing(second, "second")
        assert slot == evicted and layers == len(second) // 2
        recycled = adapter_state(adapters, slot)
        adapters.delete(slot)
        adapters.load("fresh", second, "fresh")
        fresh = adapter_state(adapters, "fresh")
        assert same_state(recycled, fresh)
    finally:
        for name in loaded(pipe):
            adapters.delete(name)


def test_a_kohya_file_refills_a_slot_or_loads_freshly_to_the_same_state(adapters, pipe):
    """kohya's fused qkv and `.alpha`: whichever way diffusers' conversion takes it, the
    layers end as a fresh load of the same file makes them."""
    first, _ = kohya_flux(pipe, 31)
    second, _ = kohya_flux(pipe, 32)
    evicted, _ = adapters.load_reusing(first, "first")
    adapters.release(evicted)
    name, _ = adapters.load_reusing(second, "second")
    recycled = adapter_state(adapters, name)
    for adapter_name in loaded(pipe):
        adapters.delete(adapter_name)
    adapters.load("fresh", second, "fresh")
    assert same_state(recycled, adapter_state(adapters, "fresh"))
