"""Prompt tags and trigger words, without Serve: parsing, tidying, names, metadata headers."""

from __future__ import annotations

import pytest
import torch

from deployments.errors import InvalidRequest
from deployments.loras.formats import trigger_words
from deployments.loras.store import LoraStore
from serve.prompt_tags import LoraTag, extract_lora_tags
from tests.lora_files import write_lora


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        ("a fox <lora:ink:0.5>", "a fox"),
        ("<lora:ink> a fox", "a fox"),
        ("a fox, <lora:ink:0.5>, in the snow", "a fox, in the snow"),
        ("a fox,<lora:ink>,<lora:b:0.2>, in the snow,", "a fox, in the snow"),
        ("a fox <LORA:ink:1> in  the snow", "a fox in the snow"),
        ("a fox\n<lora:ink>\nat dawn", "a fox\n\nat dawn"),
        ("no tags, here", "no tags, here"),
    ],
)
def test_tags_are_removed_and_the_prompt_tidied(prompt, text):
    assert extract_lora_tags(prompt)[0] == text


@pytest.mark.parametrize(
    ("tag", "strength", "clip_strength"),
    [
        ("<lora:ink>", 1.0, 1.0),
        ("<lora:ink:0.8>", 0.8, 0.8),
        ("<lora:ink:0.2:0.6>", 0.6, 0.2),  # AUTOMATIC1111: text encoder first, then UNet
        ("<lora:ink:unet=0.6:te=0.2>", 0.6, 0.2),
        ("<lora:ink:0.3:unet=0.9>", 0.9, 0.3),
    ],
)
def test_tag_weights_follow_automatic1111(tag, strength, clip_strength):
    [parsed] = extract_lora_tags(f"a fox {tag}")[1]
    assert (parsed.name, parsed.strength, parsed.clip_strength) == ("ink", strength, clip_strength)


def test_tags_keep_their_order():
    tags = extract_lora_tags("<lora:b:0.5> a fox <lora:styles/ink> <lora:a>")[1]
    assert [tag.name for tag in tags] == ["b", "styles/ink", "a"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a fox <lora:ink:lots>", "prompt: <lora:ink:lots>: weight 'lots' is not a number"),
        ("a fox <lora:ink:2.5>", "prompt: <lora:ink:2.5>: weight 2.5 is outside 0.0-2.0"),
        ("a fox <lora:ink:nan>", "weight nan is outside"),
        ("a fox <lora::1>", "prompt: <lora::1>: the tag names no LoRA"),
        ("a fox <lora:ink:1:1:1>", "at most two weights"),
        ("a fox <lora:ink:dyn=4>", "unknown parameter 'dyn'"),
        ("<lora:ink>, ", "prompt: nothing is left once its <lora:...> tags are removed"),
    ],
)
def test_malformed_tags_are_refused_naming_the_prompt(prompt, message):
    with pytest.raises(InvalidRequest) as error:
        extract_lora_tags(prompt)
    assert message in error.value.message


@pytest.mark.parametrize(
    ("name", "file_names"),
    [
        ("ink", ["ink.safetensors", "character-ink.safetensors"]),
        ("styles/ink", ["styles/ink.safetensors"]),
        ("ink.safetensors", ["ink.safetensors"]),
    ],
)
def test_a_tag_names_a_file_then_a_character_lora(name, file_names):
    assert LoraTag(text="", name=name, strength=1, clip_strength=1).file_names() == file_names


def test_metadata_is_read_from_the_header_alone(tmp_path):
    tensors = {"transformer.x.lora_A.weight": torch.ones(4, 64)}
    path = write_lora(tmp_path / "fox.safetensors", tensors, metadata={"trigger_word": "ohwx"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 512])  # tensor data cut short: the header is intact
    store = LoraStore(str(tmp_path))
    metadata = store.read_metadata(store.resolve("fox.safetensors"))
    assert trigger_words(metadata) == ["ohwx"]
