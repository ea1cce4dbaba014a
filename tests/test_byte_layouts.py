"""Cold loads from a file's bytes (`PipelineAdapters.prepare` / `load_prepared`), and switches
between hot adapters that set only the layers the two stacks use.

A file whose layout was seen before is neither parsed nor converted: its bytes are copied into
a free slot, in one copy once the slot is laid out as the file's data. It must end exactly as a
fresh load of the same file, and everything that is not a plain rename of keys (kohya alphas,
metadata alpha, a truncated file) must take the general path. A switch must leave every layer
as diffusers' `set_adapters` would.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from deployments.adapters import PipelineAdapters
from deployments.errors import LoraIncompatible
from deployments.family import get_family
from deployments.loras.formats import LORA_ADAPTER_METADATA_KEY
from tests.adapter_helpers import (
    CLIP_TARGETS,
    adapter_state,
    fresh_image,
    kohya_flux,
    loaded,
    lora_parameters,
    on,
    same_state,
    with_adapters,
)
from tests.lora_files import lora_tensors, write_lora


@pytest.fixture(scope="module")
def pipe(tiny_pipelines):
    return tiny_pipelines("flux")


@pytest.fixture(scope="module")
def made(pipe, tmp_path_factory):
    """`made(seed, **options)` -> (the file's bytes, its tensors): transformer and CLIP keys."""
    folder = tmp_path_factory.mktemp("bytes")

    def make(seed: int, metadata: dict | None = None) -> tuple[bytes, dict]:
        tensors = lora_tensors(pipe.transformer, "transformer", seed)
        tensors |= lora_tensors(pipe.text_encoder, "text_encoder", seed + 100, 4, CLIP_TARGETS)
        path = write_lora(folder / f"{seed}.safetensors", tensors, metadata)
        return path.read_bytes(), tensors

    return make


@pytest.fixture
def adapters(pipe):
    adapters = PipelineAdapters(pipe, get_family("flux"), max_adapters=1)
    yield adapters
    for name in loaded(pipe):
        adapters.delete(name)


def evicted_slot(adapters, made, seed: int) -> str:
    """A free slot left by an adapter of `made`'s layout."""
    name, _ = adapters.load_prepared(adapters.prepare(made(seed)[0], "evicted"))
    adapters.release(name)
    assert adapters.free_slots() == [name]
    return name


@pytest.mark.parametrize("fuse", [False, True])
def test_a_known_layout_loads_from_bytes_to_the_image_of_a_fresh_load(adapters, made, pipe, fuse):
    # The images of fresh loads first (fresh_image deletes every adapter of the pipeline).
    want = {seed: fresh_image(pipe, made(seed)[1], (0.8, 0.6), fuse=fuse)[0] for seed in (2, 3)}
    adapters.fuse_single = fuse
    slot = evicted_slot(adapters, made, 1)
    for seed in (2, 3):  # the first lays the slot out as the file's data, the second copies
        data, tensors = made(seed)
        prepared = adapters.prepare(data, f"lora{seed}")
        assert prepared.layout is not None and prepared.tensors is None  # neither parsed
        name, layers = adapters.load_prepared(prepared)
        assert name == slot and layers == len(tensors) // 2
        assert adapters.slots._packed[slot][1].numel() == prepared.layout.data_size
        assert np.array_equal(with_adapters(adapters, on(slot, 0.8, 0.6)), want[seed])
        adapters.release(slot)


def test_a_refill_is_one_copy_into_the_same_buffer_and_memory_stays_flat(adapters, made, pipe):
    slot = evicted_slot(adapters, made, 1)
    adapters.load_prepared(adapters.prepare(made(2)[0], "two"))
    flat = adapters.slots._packed[slot][1]
    parameters = lora_parameters(pipe)
    for seed in range(3, 9):
        adapters.release(slot)
        data, tensors = made(seed)
        name, _ = adapters.load_prepared(adapters.prepare(data, f"lora{seed}"))
        assert name == slot
        assert adapters.slots._packed[slot][1] is flat  # the same buffer, refilled
        assert lora_parameters(pipe) == parameters
        state = adapter_state(adapters, slot)
    # The last file's matrices, as the layers hold them.
    for key, tensor in tensors.items():
        path, _, kind = key.removesuffix(".weight").rpartition(".")
        assert torch.equal(state[f"{path}.{kind}"], tensor)


def test_every_family_loads_a_known_layout_to_the_state_of_a_fresh_load(tiny_pipelines, tmp_path):
    for family in ("sdxl", "qwen_image", "z_image", "wan", "flux"):
        spec = get_family(family)
        pipe = tiny_pipelines(family)
        denoiser = getattr(pipe, spec.denoiser_component)
        files = []
        for seed in (41, 42, 43):
            tensors = lora_tensors(
                denoiser, spec.denoiser_component, seed, targets=spec.lora_targets
            )
            path = write_lora(tmp_path / f"{family}{seed}.safetensors", tensors)
            files.append((path.read_bytes(), tensors))
        adapters = PipelineAdapters(pipe, spec, max_adapters=1)
        try:
            name, _ = adapters.load_prepared(adapters.prepare(files[0][0], "first"))
            for data, _ in files[1:]:
                adapters.release(name)
                prepared = adapters.prepare(data, "next")
                name, _ = adapters.load_prepared(prepared)
                recycled = adapter_state(adapters, name)
            assert prepared.layout is not None, family  # diffusers-layout files rename only
            adapters.delete(name)
            adapters.load("fresh", files[-1][1], "fresh")
            assert same_state(recycled, adapter_state(adapters, "fresh")), family
        finally:
            for adapter_name in loaded(pipe):
                adapters.delete(adapter_name)


def test_kohya_alphas_and_metadata_alpha_take_the_general_path(adapters, made, pipe, tmp_path):
    slot = evicted_slot(adapters, made, 1)
    kohya, _ = kohya_flux(pipe, 51)
    path = write_lora(tmp_path / "kohya.safetensors", kohya)
    prepared = adapters.prepare(path.read_bytes(), "kohya")
    assert prepared.layout is None  # `.alpha` scales the matrices: no byte layout
    name, _ = adapters.load_prepared(prepared)
    got = with_adapters(adapters, on(name))
    for adapter_name in loaded(pipe):
        adapters.delete(adapter_name)
    fresh = PipelineAdapters(pipe, get_family("flux"))
    fresh.load("fresh", kohya, "fresh")
    assert np.array_equal(got, with_adapters(fresh, on("fresh")))
    fresh.delete("fresh")

    # The same keys as a known layout, with diffusers' metadata alpha = 2 x rank.
    slot = evicted_slot(adapters, made, 1)
    metadata = {
        LORA_ADAPTER_METADATA_KEY: json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})
    }
    data, tensors = made(52, metadata)
    prepared = adapters.prepare(data, "alpha")
    assert prepared.layout is None
    name, _ = adapters.load_prepared(prepared)
    assert name == slot
    got = with_adapters(adapters, on(name))
    adapters.release(name)
    doubled = {
        key: t * 2 if key.startswith("transformer") and key.endswith("lora_B.weight") else t
        for key, t in tensors.items()
    }
    assert np.array_equal(got, fresh_image(pipe, doubled, (1.0, 1.0))[0])


def test_a_truncated_file_of_a_known_layout_is_refused_and_changes_nothing(adapters, made, pipe):
    evicted_slot(adapters, made, 1)
    data, _ = made(61)
    adapters.prepare(data, "whole")  # the layout is known from here on
    state = (loaded(pipe), adapters.free_slots(), lora_parameters(pipe))
    with pytest.raises(LoraIncompatible, match="Failed to load LoRA: cut: corrupt"):
        adapters.prepare(data[:-16], "cut")
    assert (loaded(pipe), adapters.free_slots(), lora_parameters(pipe)) == state


def through_library(adapters, *stack) -> np.ndarray:
    """The stack's image, activated through diffusers: the applied stack forgotten first, as
    after a load or a delete, so no layer-local switch is taken."""
    adapters.activation.reset()
    return with_adapters(adapters, *stack)


@pytest.mark.parametrize("fuse", [False, True])
def test_switches_leave_every_layer_as_the_library_sets_it(pipe, made, fuse):
    """Each stack in turn through the layer-local switch, against the same stack activated
    through diffusers (the state forgotten first), image for image."""
    adapters = PipelineAdapters(pipe, get_family("flux"), fuse_single=fuse, max_adapters=4)
    try:
        names = [
            adapters.load_prepared(adapters.prepare(made(s)[0], f"l{s}"))[0] for s in (71, 72, 73)
        ]
        a, b, c = names
        # Block weights: the double blocks at half strength, the single blocks off.
        blocks = adapters.block_scales(
            {"transformer_blocks": 0.5, "single_transformer_blocks": 0}, "b"
        )
        stacks = [
            [on(a)],
            [on(b, 0.7, 0.3)],
            [on(a, 0.5), on(c, 1.2, 0.0)],
            [],
            [on(c)],
            [replace(on(b), block_scales=blocks)],
            [on(b)],
        ]
        layer_local = []
        activate_layers = adapters.activation._activate_layers
        adapters.activation._activate_layers = lambda *args: layer_local.append(
            activate_layers(*args)
        )
        for stack in stacks:
            switched = with_adapters(adapters, *stack)
            assert np.array_equal(switched, through_library(adapters, *stack)), stack
        assert len(layer_local) >= len(stacks) - 1  # every switch after the first
        assert not np.array_equal(with_adapters(adapters, on(a)), with_adapters(adapters))
    finally:
        for name in loaded(pipe):
            adapters.delete(name)


@pytest.mark.parametrize("fuse", [False, True])
def test_a_chain_of_switches_renders_each_stack_as_the_library_does(pipe, made, fuse):
    """Switch after switch, with no reset between them: a switch into a fused adapter leaves
    its layers' active lists as they were (only their scales are set), and every later
    switch must still render each stack as diffusers' activation of it does. One adapter
    covers only some of the layers, so the others must turn the previous adapter off."""
    adapters = PipelineAdapters(pipe, get_family("flux"), fuse_single=fuse, max_adapters=4)
    try:
        a, b = (adapters.load_prepared(adapters.prepare(made(s)[0], f"c{s}"))[0] for s in (91, 92))
        partial = lora_tensors(pipe.transformer, "transformer", 93, targets=("to_q", "to_k"))
        p = "p"
        adapters.load(p, partial, p)
        assert 0 < adapters.layer_count(p) < adapters.layer_count(a)
        stacks = [[on(a)], [on(p)], [on(a)], [on(b, 0.6)], [on(a), on(b)], [on(b)], []]
        stacks += [[on(p, 1.3)], [on(a, 0.5), on(p)], [on(a)], [on(p)], []]
        wanted = [through_library(adapters, *stack) for stack in stacks]
        adapters.activate([])  # the chain starts from the library's state for no adapter
        layer_local = []
        activate_layers = adapters.activation._activate_layers
        adapters.activation._activate_layers = lambda *args: layer_local.append(
            activate_layers(*args)
        )
        for stack, image in zip(stacks, wanted, strict=True):
            assert np.array_equal(with_adapters(adapters, *stack), image), stack
        assert len(layer_local) == len(stacks)  # every one a layer-local switch
        assert not np.array_equal(wanted[0], wanted[1])
    finally:
        for name in loaded(pipe):
            adapters.delete(name)


def test_a_half_precision_file_is_copied_matrix_by_matrix_into_a_float_slot(
    adapters, pipe, tmp_path
):
    """Files in another dtype than the model's cannot be viewed in place: each matrix is cast
    on its copy, to the state a fresh load of the same file gives."""
    files = []
    for seed in (81, 82, 83):
        tensors = lora_tensors(pipe.transformer, "transformer", seed)
        half = {key: tensor.half() for key, tensor in tensors.items()}
        files.append((write_lora(tmp_path / f"{seed}.safetensors", half).read_bytes(), half))
    name, _ = adapters.load_prepared(adapters.prepare(files[0][0], "first"))
    for data, _ in files[1:]:
        adapters.release(name)
        prepared = adapters.prepare(data, "half")
        name, _ = adapters.load_prepared(prepared)
        assert prepared.layout is not None and name not in adapters.slots._packed
    recycled = adapter_state(adapters, name)
    for adapter_name in loaded(pipe):
        adapters.delete(adapter_name)
    adapters.load("fresh", files[-1][1], "fresh")
    assert same_state(recycled, adapter_state(adapters, "fresh"))


def test_files_whose_metadata_differs_share_a_layout_by_their_entries(adapters, made, pipe):
    """Another trainer's note in the metadata changes the header's bytes, not where the
    matrices lie: the second file is found by its tensor entries, not parsed."""
    evicted_slot(adapters, made, 1)
    first, _ = made(91, {"ss_output_name": "first"})
    second, tensors = made(92, {"ss_output_name": "other"})  # the same header length
    header_end = 8 + int.from_bytes(first[:8], "little")
    assert first[:8] == second[:8] and first[8:header_end] != second[8:header_end]
    adapters.prepare(first, "first")
    prepared = adapters.prepare(second, "second")
    assert prepared.layout is not None and prepared.tensors is None
    name, _ = adapters.load_prepared(prepared)
    state = adapter_state(adapters, name)
    for key, tensor in tensors.items():
        path, _, kind = key.removesuffix(".weight").rpartition(".")
        assert torch.equal(state[f"{path}.{kind}"], tensor)
