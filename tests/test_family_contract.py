"""The contract every model family keeps, checked on each family's tiny pipeline: it is the
family's pipeline class, renders deterministically (and identically from a second build or a
saved copy), follows its inputs, and LoRAs change it while strength 0, turning them off or
deleting them gives back exactly the output without them.

As in diffusers' PeftLoraLoaderMixinTests, the tests are shared and each family supplies only
its `FamilyCase` (tests/family_helpers.py): its small job, its LoRA targets, its tolerances.
What is particular to a family (formats, markers, clip strength, lengths, production
defaults) stays in its own module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments import load_pipeline
from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.family import FAMILY_NAMES
from tests.adapter_helpers import loaded, on
from tests.family_helpers import CASES, FamilyCase, differs
from tests.lora_files import lora_tensors


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def case(request) -> FamilyCase:
    """One family at a time: pytest runs all of a family's tests before the next is built."""
    assert request.param in CASES, f"{request.param} has no FamilyCase in tests/family_helpers.py"
    return CASES[request.param]


@pytest.fixture(scope="module")
def pipe(case):
    return case.build()


@pytest.fixture(scope="module")
def second_build(case):
    """Another tiny pipeline of the family, built as the first was; no test loads a LoRA in it."""
    return case.build()


@pytest.fixture(scope="module")
def loras(case, pipe) -> dict[str, dict[str, torch.Tensor]]:
    """Rank-4 LoRAs from the bare denoiser: `a` on the case's targets, `trained` on the layers
    our own training adapts (the spec's lora_targets)."""
    name = case.spec.denoiser_component
    denoiser = getattr(pipe, name)
    return {
        "a": lora_tensors(denoiser, name, 1, targets=case.lora_targets),
        "trained": lora_tensors(denoiser, name, 2, targets=case.spec.lora_targets),
    }


@pytest.fixture(scope="module")
def base(case, pipe, loras) -> np.ndarray:
    return case.render(pipe)


@pytest.fixture
def adapters(case, pipe, base):
    """PipelineAdapters on the family's shared pipeline; each test's adapters are deleted after
    it."""
    adapters = PipelineAdapters(pipe, case.spec)
    yield adapters
    for name in loaded(pipe):
        adapters.delete(name)


def render_with(case: FamilyCase, adapters, *active: ActiveAdapter) -> np.ndarray:
    adapters.activate(list(active))
    return case.render(adapters.pipe)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_pipeline_is_the_family_pipeline_in_float32_on_cpu(case, pipe, base):
    assert isinstance(pipe, case.spec.pipeline_class)
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"
    assert base.shape == case.output_shape


def test_output_is_deterministic_per_seed_and_identical_across_builds(
    case, pipe, second_build, base
):
    # That one pipeline renders `base` again after other renders, the LoRA test checks.
    assert np.array_equal(case.render(second_build), base)
    assert differs(case.render(pipe, seed=1), base) > case.visible


def test_each_input_of_the_job_changes_the_output(case, pipe, base):
    assert case.changes.keys() >= {"prompt"}
    for name, change in case.changes.items():
        assert differs(case.render(pipe, **change), base) > case.visible, name


def test_saved_model_loads_back_identical(case, second_build, base, tmp_path):
    # The second build, whose layers no LoRA has wrapped with peft's.
    second_build.save_pretrained(tmp_path / case.family)
    saved = load_pipeline(case.family, str(tmp_path / case.family))
    assert type(saved) is type(second_build)
    assert {name: type(c) for name, c in saved.components.items()} == {
        name: type(c) for name, c in second_build.components.items()
    }
    for name, component in second_build.components.items():
        if name.startswith("tokenizer"):  # Z-Image's chat template formats every prompt
            assert saved.components[name].chat_template == component.chat_template, name
    assert np.array_equal(case.render(saved), base)


def test_loras_change_the_output_stack_and_at_zero_off_or_deleted_give_exactly_the_base(
    case, adapters, pipe, loras, base
):
    """The adapter life cycle in one test, so that a family's renders are shared: the edit
    model renders in about a second even when tiny."""
    lora, trained, component = loras["a"], loras["trained"], case.spec.denoiser_component
    denoiser = getattr(pipe, component)
    before = parameter_count(denoiser)
    assert adapters.check(lora, "a") == len(lora)
    assert adapters.load("a", lora, "a") == len(lora) // 2 == case.lora_layers
    assert pipe.get_list_adapters() == {component: ["a"]}
    assert parameter_count(denoiser) > before
    with_lora = render_with(case, adapters, on("a"))
    assert differs(with_lora, base) > case.lora_visible
    assert np.array_equal(render_with(case, adapters, on("a", 0.0, 0.0)), base)
    assert np.array_equal(render_with(case, adapters), base)

    # A second LoRA, on the layers our own training adapts, stacks on the first; at strength
    # 0 it adds nothing, and the first, turned on again after strength 0 and off, is as it was.
    assert adapters.check(trained, "trained") == len(trained)
    assert adapters.load("trained", trained, "trained") == len(trained) // 2
    assert pipe.get_list_adapters() == {component: ["a", "trained"]}
    stacked = render_with(case, adapters, on("a"), on("trained", 0.5))
    assert differs(stacked, with_lora) > case.lora_visible
    assert np.array_equal(render_with(case, adapters, on("a"), on("trained", 0.0)), with_lora)

    adapters.delete("trained")
    assert adapters.layer_count("trained") == 0
    assert pipe.get_list_adapters() == {component: ["a"]}
    adapters.delete("a")
    assert parameter_count(denoiser) == before
    assert adapters.layer_count("a") == 0
    assert pipe.get_list_adapters() == {}
    assert np.array_equal(case.render(pipe), base)
