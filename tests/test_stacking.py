"""Stacks of adapters and per-block strengths inside one tiny pipeline (no Serve needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments import load_pipeline
from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.errors import InvalidRequest
from deployments.family import FAMILY_NAMES, get_family
from tests.lora_files import lora_tensors

PROMPT = "a red fox in the snow"
SMALL = {"width": 128, "height": 128, "num_inference_steps": 2}
# Adapters kept beside the weights vs merged into them differ only by float rounding;
# measured max abs pixel difference (floats in [0, 1]): 2.8e-6.
MERGE_TOLERANCE = 1e-4
VISIBLE = 0.005  # mean abs pixel difference (floats in [0, 1]) that counts as a change
FLUX_GROUPS = ("transformer_blocks", "single_transformer_blocks")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("flux", "tiny://flux")


@pytest.fixture(scope="module")
def files(pipe):
    """LoRA tensors made from the bare model, before any test wraps its layers with peft's."""
    return {
        "a": lora_tensors(pipe.transformer, "transformer", 1),
        "b": lora_tensors(pipe.transformer, "transformer", 2, rank=8),
    }


@pytest.fixture(scope="module")
def base(pipe, files):
    return image(pipe)


@pytest.fixture
def adapters(pipe, files, base):
    adapters = PipelineAdapters(pipe, get_family("flux"))
    adapters.load("a", files["a"], "a")
    adapters.load("b", files["b"], "b")
    yield adapters
    for name in {name for names in pipe.get_list_adapters().values() for name in names}:
        adapters.delete(name)


def image(pipe) -> np.ndarray:
    with torch.inference_mode():
        result = pipe(
            PROMPT, **SMALL, generator=torch.Generator("cpu").manual_seed(0), output_type="np"
        )
    return result.images[0]


def with_adapters(adapters: PipelineAdapters, *active: ActiveAdapter) -> np.ndarray:
    adapters.activate(list(active))
    return image(adapters.pipe)


def weighted(adapters, name: str, strength: float = 1.0, **block_weights) -> ActiveAdapter:
    scales = adapters.block_scales(block_weights, "loras.0.block_weights")
    return ActiveAdapter(name, strength, strength, scales)


def merged_by_hand(stack: list[tuple[dict[str, torch.Tensor], float]]):
    """A fresh pipeline with W += strength * B @ A of each adapter added into its weights
    (alpha = rank in these files, so peft's alpha/rank scale is 1)."""
    pipe = load_pipeline("flux", "tiny://flux")
    with torch.no_grad():
        for tensors, strength in stack:
            for key, down in tensors.items():
                if ".lora_A." not in key:
                    continue
                up = tensors[key.replace(".lora_A.", ".lora_B.")]
                path = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                pipe.transformer.get_submodule(path).weight += strength * (up @ down)
    return pipe


def test_a_stack_equals_its_weights_merged_by_hand(adapters, files, base):
    stacked = with_adapters(adapters, ActiveAdapter("a", 0.7, 0.7), ActiveAdapter("b", 0.4, 0.4))
    merged = image(merged_by_hand([(files["a"], 0.7), (files["b"], 0.4)]))
    assert np.abs(stacked - base).mean() > VISIBLE
    assert np.abs(stacked - merged).max() < MERGE_TOLERANCE


def test_a_scale_change_reuses_the_loaded_layers(adapters, pipe):
    layers = {id(m) for m in pipe.transformer.modules()}
    half = with_adapters(adapters, ActiveAdapter("a", 0.5, 0.5))
    full = with_adapters(adapters, ActiveAdapter("a", 1.0, 1.0))
    assert np.abs(half - full).mean() > VISIBLE
    assert {id(m) for m in pipe.transformer.modules()} == layers
    assert np.array_equal(with_adapters(adapters, ActiveAdapter("a", 0.5, 0.5)), half)


def test_block_weights_of_one_are_the_plain_adapter_and_zero_is_the_base(adapters, base):
    plain = with_adapters(adapters, ActiveAdapter("a", 0.8, 0.8))
    ones = dict.fromkeys(FLUX_GROUPS, 1.0)
    assert np.array_equal(with_adapters(adapters, weighted(adapters, "a", 0.8, **ones)), plain)
    per_block = {"transformer_blocks": [1.0, 1.0], "single_transformer_blocks": [1, 1]}
    assert np.array_equal(with_adapters(adapters, weighted(adapters, "a", 0.8, **per_block)), plain)
    zeros = dict.fromkeys(FLUX_GROUPS, 0.0)
    assert np.array_equal(with_adapters(adapters, weighted(adapters, "a", 0.8, **zeros)), base)
    # The weighted stack was cached: the plain one must be set again in full.
    assert np.array_equal(with_adapters(adapters, ActiveAdapter("a", 0.8, 0.8)), plain)


def test_a_block_weight_multiplies_the_strength(adapters):
    full = with_adapters(adapters, ActiveAdapter("a", 1.0, 1.0))
    doubled = dict.fromkeys(FLUX_GROUPS, 2.0)
    assert np.array_equal(with_adapters(adapters, weighted(adapters, "a", 0.5, **doubled)), full)


def test_one_group_changes_the_image_unlike_the_full_adapter(adapters, base):
    full = with_adapters(adapters, ActiveAdapter("a", 1.0, 1.0))
    single_only = with_adapters(adapters, weighted(adapters, "a", transformer_blocks=0))
    double_only = with_adapters(adapters, weighted(adapters, "a", single_transformer_blocks=0))
    for partial in (single_only, double_only):
        assert np.abs(partial - base).mean() > VISIBLE
        assert np.abs(partial - full).mean() > VISIBLE
    assert np.abs(single_only - double_only).mean() > VISIBLE


def test_a_per_block_list_weights_each_block(adapters, pipe, files):
    """[1, 0] over the double blocks is exactly a file holding block 0's matrices only."""
    block_0 = {
        key: tensor
        for key, tensor in files["a"].items()
        if key.startswith("transformer.transformer_blocks.0.")
    }
    adapters.load("block_0", block_0, "block_0")
    only_block_0 = with_adapters(adapters, ActiveAdapter("block_0", 1.0, 1.0))
    weights = {"transformer_blocks": [1.0, 0.0], "single_transformer_blocks": 0.0}
    assert np.array_equal(with_adapters(adapters, weighted(adapters, "a", **weights)), only_block_0)


def test_block_weights_apply_to_their_adapter_only(adapters, base):
    b_plain = with_adapters(adapters, ActiveAdapter("b", 0.6, 0.6))
    zeros = dict.fromkeys(FLUX_GROUPS, 0.0)
    stack = with_adapters(
        adapters, weighted(adapters, "a", 1.0, **zeros), ActiveAdapter("b", 0.6, 0.6)
    )
    assert np.array_equal(stack, b_plain)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (
            {"foo": 1.0},
            "loras.0.block_weights: unknown block group 'foo' for flux; expected "
            "transformer_blocks, single_transformer_blocks",
        ),
        (
            {"transformer_blocks": [1.0, 1.0, 1.0]},
            "loras.0.block_weights.transformer_blocks: 3 weights given, but this model's "
            "transformer_blocks has 2 blocks",
        ),
    ],
)
def test_bad_block_weights_name_the_field(adapters, weights, message):
    with pytest.raises(InvalidRequest) as error:
        adapters.block_scales(weights, "loras.0.block_weights")
    assert message in error.value.message


def test_sdxl_groups_follow_comfyui_numbering_over_diffusers_modules(tiny_pipelines):
    """SGM layout: input_blocks 0 is conv_in, then a block per layer and per downsampler; the
    tiny UNet has 2 down blocks of 2 layers, so 6 input blocks, 1 middle, 6 output."""
    pipe = tiny_pipelines("sdxl")
    adapters = PipelineAdapters(pipe, get_family("sdxl"))
    blocks = adapters.blocks.blocks
    assert {group: len(found) for group, found in blocks.items()} == {
        "input_blocks": 6,
        "middle_block": 1,
        "output_blocks": 6,
    }
    assert blocks["input_blocks"][0] == ("conv_in",)
    assert blocks["input_blocks"][4] == ("down_blocks.1.resnets.0", "down_blocks.1.attentions.0")
    assert blocks["output_blocks"][2][-1] == "up_blocks.0.upsamplers"
    assert adapters.blocks.block_of("mid_block.attentions.0.transformer_blocks.0.attn1.to_q") == (
        "middle_block",
        0,
    )
    assert adapters.blocks.block_of("time_embedding.linear_1") is None


def test_sdxl_block_weights_select_unet_blocks():
    pipe = load_pipeline("sdxl", "tiny://sdxl")
    family = get_family("sdxl")
    adapters = PipelineAdapters(pipe, family)
    tensors = lora_tensors(pipe.unet, "unet", 1, targets=family.lora_targets)
    base = image(pipe)
    adapters.load("unet", tensors, "unet")
    full = with_adapters(adapters, ActiveAdapter("unet", 1.0, 1.0))
    zeros = dict.fromkeys(family.block_groups.names, 0.0)
    assert np.array_equal(with_adapters(adapters, weighted(adapters, "unet", **zeros)), base)
    outputs_off = with_adapters(adapters, weighted(adapters, "unet", output_blocks=0))
    assert np.abs(outputs_off - base).mean() > VISIBLE
    assert np.abs(outputs_off - full).mean() > VISIBLE
    comfy = {"input_blocks": [0.5] * 6, "middle_block": [1.0], "output_blocks": 1.0}
    assert adapters.block_scales(comfy, "f") == (
        ("input_blocks", (0.5,) * 6),
        ("middle_block", (1.0,)),
        ("output_blocks", (1.0,) * 6),
    )


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_every_trained_layer_lies_in_a_block_group(tiny_pipelines, family_name):
    """A block-weighted adapter reaches every layer a LoRA of this family trains."""
    family = get_family(family_name)
    pipe = tiny_pipelines(family_name)
    adapters = PipelineAdapters(pipe, family)
    denoiser = getattr(pipe, family.denoiser_component)
    trained = [name for name, _ in denoiser.named_modules() if name.endswith(family.lora_targets)]
    assert trained
    assert [name for name in trained if adapters.blocks.block_of(name) is None] == []
    assert all(len(blocks) > 0 for blocks in adapters.blocks.blocks.values())
