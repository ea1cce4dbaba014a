"""LoRA adapters inside one tiny Flux pipeline: kohya files, the text encoder's part and clip
strength, exact stacking, and refusing files for another model (what every family keeps is in
tests/test_family_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments import load_pipeline
from deployments.adapters import PipelineAdapters
from deployments.errors import LoraIncompatible
from deployments.family import get_family
from tests.adapter_helpers import (
    CLIP_TARGETS,
    PROMPT,
    from_file,
    image,
    kohya_flux,
    loaded,
    on,
    with_adapters,
)
from tests.lora_files import lora_tensors

# kohya vs hand-converted diffusers tensors differ only in where alpha/rank is multiplied in;
# measured max abs pixel difference (floats in [0, 1]) with alpha/rank 0.75: 3.6e-6. (A power
# of two such as 0.5 scales exactly and gives 0.0, which would not exercise the tolerance.)
FORMAT_TOLERANCE = 1e-4
# Two rank-4 adapters vs the one rank-8 adapter they add up to; measured: 2.7e-6.
STACK_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("flux", "tiny://flux")


@pytest.fixture(scope="module")
def files(pipe):
    """LoRA tensors made from the bare model, before any test wraps its layers with peft's."""
    return {
        "a": lora_tensors(pipe.transformer, "transformer", 1),
        "b": lora_tensors(pipe.transformer, "transformer", 2),
        "clip": lora_tensors(pipe.text_encoder, "text_encoder", 3, targets=CLIP_TARGETS),
    }


@pytest.fixture(scope="module")
def base(pipe, files):
    return image(pipe)


@pytest.fixture
def adapters(pipe, files, base):
    """A PipelineAdapters on the shared pipeline; each test's adapters are deleted after it."""
    adapters = PipelineAdapters(pipe, get_family("flux"))
    yield adapters
    for name in loaded(pipe):
        adapters.delete(name)


def clip_output(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(
        PROMPT,
        padding="max_length",
        max_length=pipe.tokenizer_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.inference_mode():
        return pipe.text_encoder(ids).last_hidden_state.clone()


def test_kohya_flux_file_matches_its_diffusers_conversion(adapters, pipe, tmp_path, base):
    kohya, diffusers = kohya_flux(pipe, seed=5, rank=4, alpha=3.0)
    unscaled, _ = kohya_flux(pipe, seed=5, rank=4, alpha=4.0)
    double_blocks = pipe.transformer.config.num_layers
    assert adapters.check(kohya, "kohya") == 8 * double_blocks  # q, k, v and out: A and B
    assert adapters.load("kohya", from_file(tmp_path, kohya), "kohya") == 4 * double_blocks
    adapters.load("diffusers", diffusers, "diffusers")
    adapters.load("unscaled", unscaled, "unscaled")
    from_kohya = with_adapters(adapters, on("kohya"))
    assert np.abs(from_kohya - base).mean() > 0.01
    assert np.abs(from_kohya - with_adapters(adapters, on("diffusers"))).max() < FORMAT_TOLERANCE
    # alpha == rank gives scale 1 instead of 0.75 (measured max difference 0.1): a different
    # image, far beyond rounding, shows alpha/rank was applied.
    assert np.abs(from_kohya - with_adapters(adapters, on("unscaled"))).max() > 0.01


def test_clip_strength_scales_only_the_text_encoder_part(adapters, pipe, files):
    adapters.load("both", {**files["a"], **files["clip"]}, "both")
    assert pipe.get_list_adapters() == {"transformer": ["both"], "text_encoder": ["both"]}
    adapters.activate([])
    base_clip = clip_output(pipe)
    transformer_only = with_adapters(adapters, on("both", 1.0, 0.0))
    assert torch.equal(clip_output(pipe), base_clip)
    both = with_adapters(adapters, on("both", 1.0, 1.0))
    assert not torch.allclose(clip_output(pipe), base_clip, atol=1e-3)
    assert np.abs(both - transformer_only).mean() > 0.01
    # clip_strength 0 is the transformer LoRA alone, exactly.
    adapters.load("a", files["a"], "a")
    assert np.array_equal(with_adapters(adapters, on("a")), transformer_only)


def test_text_encoder_only_lora_loads_and_changes_the_image(adapters, pipe, files, base):
    assert adapters.check(files["clip"], "clip") == len(files["clip"])
    assert adapters.load("clip", files["clip"], "clip") == len(files["clip"]) // 2
    assert pipe.get_list_adapters() == {"text_encoder": ["clip"]}
    assert np.abs(with_adapters(adapters, on("clip")) - base).mean() > 0.01
    assert np.array_equal(with_adapters(adapters, on("clip", 1.0, 0.0)), base)


def test_two_adapters_add_up_like_one_adapter_of_both(adapters, files):
    """0.7 * B_a A_a + 0.4 * B_b A_b is one rank-8 LoRA: A stacked, B scaled side by side."""
    strengths = {"a": 0.7, "b": 0.4}
    combined = {}
    for key in files["a"]:
        if ".lora_A." in key:
            combined[key] = torch.cat([files[name][key] for name in strengths], dim=0)
        else:
            scaled = [files[name][key] * s for name, s in strengths.items()]
            combined[key] = torch.cat(scaled, dim=1)
    adapters.load("a", files["a"], "a")
    adapters.load("b", files["b"], "b")
    adapters.load("combined", combined, "combined")
    stacked = with_adapters(adapters, *(on(name, s) for name, s in strengths.items()))
    single = with_adapters(adapters, on("combined"))
    assert np.abs(stacked - with_adapters(adapters, on("a", 0.7))).mean() > 0.005
    assert np.abs(stacked - single).max() < STACK_TOLERANCE


def no_such_module(files):
    return {
        "transformer.no_such.lora_A.weight": torch.ones(4, 8),
        "transformer.no_such.lora_B.weight": torch.ones(8, 4),
    }


def wrong_shapes(files):
    """Right key names, twice the width: a LoRA for a bigger Flux."""
    return {
        key: torch.cat([m, m], dim=1 if ".lora_A." in key else 0) for key, m in files["a"].items()
    }


def partly_matching(files):
    """A good file with two LoRA pairs for modules this model lacks: 4 of 32 matrices is more
    than the few leftovers a format conversion may drop."""
    strays = {
        f"transformer.transformer_blocks.{i}.attn.no_such.lora_{kind}.weight": files["a"][
            f"transformer.transformer_blocks.0.attn.to_q.lora_{kind}.weight"
        ]
        for i in (0, 1)
        for kind in "AB"
    }
    return {**files["a"], **strays}


def text_encoder_wrong_shapes(files):
    """A transformer part that loads, then a text-encoder part that cannot: the transformer's
    half-loaded adapter must go too."""
    return {**files["a"], **wrong_shapes({"a": files["clip"]})}


def sdxl_kohya(files):
    """A kohya sd-scripts UNet LoRA for SDXL: another base model entirely."""
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return {
        f"{stem}.lora_down.weight": torch.ones(4, 320),
        f"{stem}.lora_up.weight": torch.ones(320, 4),
        f"{stem}.alpha": torch.tensor(4.0),
    }


def test_check_counts_the_matrices_of_a_good_file(adapters, pipe, files):
    assert adapters.check(files["a"], "a") == len(files["a"])
    assert pipe.get_list_adapters() == {}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (no_such_module, "0 of 2 LoRA matrices match the flux model"),
        (wrong_shapes, "to_q takes 32 inputs, the file's matrix 64: loading it would reshape"),
        (sdxl_kohya, "lora_unet_down_blocks_0_attentions_0_proj_in"),
        (partly_matching, "28 of 32 LoRA matrices match the flux model"),
        (text_encoder_wrong_shapes, "loading it would reshape the model's layer"),
    ],
)
def test_check_refuses_a_file_for_another_model(adapters, files, make, message):
    adapters.load("a", files["a"], "a")
    before = with_adapters(adapters, on("a"))
    with pytest.raises(LoraIncompatible, match="Failed to load LoRA: bad.safetensors: ") as error:
        adapters.check(make(files), "bad.safetensors")
    assert message in str(error.value)
    assert np.array_equal(with_adapters(adapters, on("a")), before)


@pytest.mark.parametrize(
    "make", [no_such_module, wrong_shapes, sdxl_kohya, text_encoder_wrong_shapes]
)
def test_failed_load_leaves_the_pipeline_as_it_was(adapters, pipe, files, make):
    adapters.load("a", files["a"], "a")
    loaded = pipe.get_list_adapters()
    before = with_adapters(adapters, on("a"))
    with pytest.raises(LoraIncompatible, match="Failed to load LoRA: bad.safetensors: "):
        adapters.load("bad", make(files), "bad.safetensors")
    assert pipe.get_list_adapters() == loaded
    assert adapters.layer_count("bad") == 0
    assert np.array_equal(with_adapters(adapters, on("a")), before)
