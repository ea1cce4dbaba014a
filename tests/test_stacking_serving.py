"""Stacks over HTTP: hot scale changes, block weights, prompt tags and automatic trigger words."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.http_helpers import error_of, flux_replica, pixels
from tests.lora_files import lora_tensors, write_lora

PROMPT = "a red fox in the snow"
SMALL = {"width": 128, "height": 128, "steps": 2}
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def generate(client, path="/flux-lora", **body):
    return client.post(path, json={"prompt": PROMPT, "seed": 3, **SMALL, **body})


def same_image(first, second) -> bool:
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    return first.content == second.content


@pytest.fixture(scope="module")
def files(lora_root, tiny_pipelines):
    """stacking/: a LoRA with a text-encoder part and the same without it, and two with
    trigger words in their metadata (loraplex's key and kohya's ss_ key). Removed afterwards."""
    pipe = tiny_pipelines("flux")
    folder = lora_root / "stacking"
    transformer = lora_tensors(pipe.transformer, "transformer", 21)
    text = lora_tensors(pipe.text_encoder, "text_encoder", 22, targets=CLIP_TARGETS)
    write_lora(folder / "with-te.safetensors", {**transformer, **text})
    write_lora(folder / "no-te.safetensors", transformer)
    write_lora(folder / "fox.safetensors", transformer, metadata={"trigger_word": "ohwx fox"})
    write_lora(
        folder / "snowy.safetensors",
        lora_tensors(pipe.transformer, "transformer", 23),
        metadata={"ss_trigger_words": '["zkz", "snowy"]'},
    )
    yield folder
    shutil.rmtree(folder)


# Hot stacks


def test_a_scale_change_on_a_hot_stack_does_not_reload(service):
    def stack(a: float, b: float, **extra):
        return generate(
            service, loras=[{"id": "a", "strength": a, **extra}, {"id": "b", "weight": b}]
        )

    first = stack(0.5, 0.5)
    loads = flux_replica(service)["adapter_loads"]
    second = stack(1.0, 0.3)
    weighted = stack(1.0, 0.3, block_weights={"single_transformer_blocks": 0.0})
    assert second.headers["X-LoRA-Cache"] == "hit,hit"
    assert weighted.headers["X-LoRA-Cache"] == "hit,hit"
    assert flux_replica(service)["adapter_loads"] == loads
    assert np.abs(pixels(first) - pixels(second)).mean() > 1.0
    assert np.abs(pixels(second) - pixels(weighted)).mean() > 1.0
    assert same_image(stack(0.5, 0.5), first)


def test_clip_strength_zero_is_the_file_without_its_text_encoder_part(service, files):
    with_te = {"name": "stacking/with-te.safetensors"}
    no_te = generate(service, lora_name="stacking/no-te.safetensors")
    te_off = generate(service, loras=[{**with_te, "clip_strength": 0}])
    te_on = generate(service, loras=[with_te])
    assert same_image(te_off, no_te)
    assert np.abs(pixels(te_on) - pixels(te_off)).mean() > 1.0
    # A1111's <lora:NAME:TE:UNET>: the first weight is the text encoder's.
    tagged = generate(service, prompt=f"{PROMPT} <lora:stacking/with-te:0:1>")
    assert same_image(tagged, te_off)


# Block weights


def test_block_weights_of_one_give_the_same_bytes_as_none(service):
    ones = {"transformer_blocks": 1, "single_transformer_blocks": [1.0, 1.0]}
    weighted = generate(service, loras=[{"id": "c", "block_weights": ones}])
    assert same_image(weighted, generate(service, lora_id="c"))
    zeros = {"transformer_blocks": 0, "single_transformer_blocks": 0}
    off = generate(service, loras=[{"id": "c", "block_weights": zeros}])
    assert same_image(off, generate(service, "/flux"))


@pytest.mark.parametrize(
    ("path", "block_weights", "message"),
    [
        (
            "/flux-lora",
            {"foo": 1.0},
            "loras.0.block_weights: unknown block group 'foo' for flux; expected "
            "transformer_blocks, single_transformer_blocks",
        ),
        (
            "/flux-lora",
            {"transformer_blocks": [1.0, 0.5, 1.0]},
            "loras.0.block_weights.transformer_blocks: 3 weights given, but this model's "
            "transformer_blocks has 2 blocks",
        ),
        ("/flux-lora", {"transformer_blocks": 2.5}, "loras.0.block_weights.transformer_blocks"),
        (
            "/sdxl-lora",
            {"transformer_blocks": 1.0},
            "expected input_blocks, middle_block, output_blocks",
        ),
    ],
)
def test_bad_block_weights_are_422_naming_the_field(service, path, block_weights, message):
    before = generate(service, lora_id="a").content
    name = "character-sdxl-a" if path == "/sdxl-lora" else "character-a"
    lora = {"name": f"{name}.safetensors", "block_weights": block_weights}
    assert message in error_of(generate(service, path, loras=[lora]), 422, "invalid_request")
    assert generate(service, lora_id="a").content == before


# Prompt tags


@pytest.mark.parametrize(
    ("prompt", "loras"),
    [
        (f"{PROMPT} <lora:character-a:0.8>", [{"name": "character-a.safetensors", "weight": 0.8}]),
        (f"<lora:a:0.8>, {PROMPT}", [{"id": "a", "strength": 0.8}]),
        (f"{PROMPT}, <lora:styles/ink:0.5>", [{"name": "styles/ink.safetensors", "scale": 0.5}]),
        (
            f"{PROMPT} <lora:b> <lora:a:te=0.2:unet=0.6>",
            [{"id": "b"}, {"id": "a", "strength": 0.6, "clip_strength": 0.2}],
        ),
    ],
)
def test_a_prompt_tag_is_the_same_as_listing_the_lora(service, prompt, loras):
    assert same_image(generate(service, prompt=prompt), generate(service, loras=loras))


def test_prompt_tags_follow_the_request_own_loras(service):
    tagged = generate(service, prompt=f"{PROMPT} <lora:b:0.5>", lora_id="a")
    listed = generate(service, loras=[{"id": "a"}, {"id": "b", "strength": 0.5}])
    assert same_image(tagged, listed)


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        ({"prompt": "a fox <lora:nosuch:0.5>"}, 404, "lora_not_found", "LoRA not found: nosuch"),
        (
            {"prompt": "a fox <lora:d> <lora:e>", "loras": [{"id": "a"}, {"id": "b"}, {"id": "c"}]},
            422,
            "invalid_request",
            "loras: 3 listed and 2 <lora:...> tags in the prompt; at most 4 in all",
        ),
        (
            {"prompt": "a fox <lora:character-a:0.5>", "lora_id": "a"},
            422,
            "invalid_request",
            "prompt: <lora:character-a:0.5>: character-a.safetensors is already in loras",
        ),
        ({"prompt": "a fox <lora:a:lots>"}, 422, "invalid_request", "prompt: <lora:a:lots>: "),
        ({"prompt": "a fox <lora:a:3>"}, 422, "invalid_request", "is outside 0.0-2.0"),
        ({"prompt": "<lora:a>"}, 422, "invalid_request", "prompt: nothing is left"),
    ],
)
def test_bad_prompt_tags_are_refused(service, body, status, code, message):
    assert message in error_of(generate(service, **body), status, code)


# Trigger words


def test_auto_trigger_words_come_from_the_file_metadata(service, files):
    fox = {"lora_name": "stacking/fox.safetensors"}
    auto = generate(service, trigger_word="auto", **fox)
    assert same_image(auto, generate(service, trigger_word="ohwx fox", **fox))
    assert np.abs(pixels(auto) - pixels(generate(service, **fox))).mean() > 1.0
    snowy = {"name": "stacking/snowy.safetensors"}
    per_item = generate(service, loras=[{**snowy, "trigger_word": "auto"}])
    assert same_image(per_item, generate(service, loras=[{**snowy, "trigger_word": "zkz, snowy"}]))


def test_auto_adds_nothing_for_a_file_without_trigger_words(service):
    without = generate(service, lora_id="a")
    assert same_image(generate(service, lora_id="a", trigger_word="auto"), without)
