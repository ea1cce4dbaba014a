"""A generation body -> GenerationJob, without Serve: defaults, LoRA forms, tags, trigger words,
and refusals that name the field."""

from __future__ import annotations

import pytest
import torch

from deployments.errors import InvalidRequest, LoraNotFound, LoraRequired
from deployments.loras.store import LoraStore
from serve.config import AppConfig
from serve.resolve import resolve_job
from tests.lora_files import write_lora

TENSORS = {"transformer.x.lora_A.weight": torch.ones(4, 64)}


@pytest.fixture
def config(tmp_path) -> AppConfig:
    write_lora(tmp_path / "character-ink.safetensors", TENSORS, {"trigger_word": "zxq ink"})
    write_lora(tmp_path / "styles/fox.safetensors", TENSORS)
    models = [
        {"name": "flux", "family": "flux", "defaults": {"steps": 4}},
        {"name": "wan", "family": "wan"},
    ]
    return AppConfig.model_validate({"lora_root": str(tmp_path), "models": models})


def resolve(config: AppConfig, body: dict, model: str = "flux", lora_required: bool = False):
    [found] = [m for m in config.models if m.name == model]
    store = LoraStore(config.lora_root)
    return resolve_job(body, found, lora_required=lora_required, store=store, config=config)


def test_the_family_defaults_apply_with_the_config_overrides(config):
    job = resolve(config, {"prompt": "a fox", "seed": 7})
    # flux's production defaults, steps from the model's config.
    assert (job.width, job.height, job.steps, job.cfg) == (1024, 1024, 4, 3.5)
    assert (job.prompt, job.seed, job.adapters) == ("a fox", 7, [])


def test_request_fields_win_over_the_defaults(config):
    body = {"prompt": "a fox", "width": 512, "steps": 2, "guidance_scale": 0.0}
    job = resolve(config, body)
    assert (job.width, job.height, job.steps, job.cfg) == (512, 1024, 2, 0.0)
    assert job.seed is not None  # drawn when absent


def test_lora_id_is_the_character_file(config):
    job = resolve(config, {"prompt": "a fox", "lora_id": "ink", "lora_strength": 0.5})
    [adapter] = job.adapters
    assert adapter.name == "character-ink.safetensors"
    assert adapter.key.startswith("character-ink.safetensors@")
    assert (adapter.strength, adapter.clip_strength) == (0.5, 0.5)


def test_a_trigger_word_is_prepended(config):
    job = resolve(config, {"prompt": "a fox", "lora_id": "ink", "trigger_word": "ohwx"})
    assert job.prompt == "ohwx, a fox"


def test_auto_trigger_words_come_from_the_file_metadata(config):
    body = {"prompt": "a fox", "loras": [{"id": "ink", "trigger_word": "auto"}]}
    assert resolve(config, body).prompt == "zxq ink, a fox"


def test_prompt_tags_follow_the_listed_loras(config):
    body = {"prompt": "a fox <lora:ink:0.25>", "loras": [{"name": "styles/fox.safetensors"}]}
    job = resolve(config, body)
    assert job.prompt == "a fox"
    assert [(a.name, a.strength) for a in job.adapters] == [
        ("styles/fox.safetensors", 1.0),
        ("character-ink.safetensors", 0.25),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a fox", "width": 5}, "width:"),
        ({"prompt": "a fox", "loras": [{"id": "ink", "strength": 3}]}, "loras.0.strength:"),
        ({"prompt": "a fox", "colour": "red"}, "colour:"),
        (
            {"prompt": "a fox", "loras": [{"id": "ink", "block_weights": {"middle_block": 1}}]},
            "loras.0.block_weights",
        ),
        ({"prompt": "a fox", "loras": [{"id": "ink"}, {"id": "ink"}]}, "loras:"),
    ],
)
def test_an_invalid_field_is_refused_by_name(config, body, field):
    with pytest.raises(InvalidRequest) as error:
        resolve(config, body)
    assert error.value.message.startswith(field) or f"; {field}" in error.value.message


def test_a_lora_endpoint_requires_a_lora(config):
    with pytest.raises(LoraRequired):
        resolve(config, {"prompt": "a fox"}, lora_required=True)


def test_an_unknown_lora_is_not_found(config):
    with pytest.raises(LoraNotFound, match="character-nope.safetensors"):
        resolve(config, {"prompt": "a fox", "lora_id": "nope"})


def test_the_family_checks_the_job(config):
    with pytest.raises(InvalidRequest, match="^length: must be 4k\\+1"):
        resolve(config, {"prompt": "a fox", "length": 10}, model="wan")
