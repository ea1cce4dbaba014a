"""Requests and config: bounded, unknown fields refused, errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.schemas import GenerationRequest
from serve.config import AppConfig
from serve.prompt_tags import prompt_with_triggers

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_short_form_becomes_a_one_item_stack():
    request = GenerationRequest(prompt="p", lora_id="abc", lora_strength=0.7)
    [spec] = request.lora_stack()
    assert spec.file_name == "character-abc.safetensors" and spec.strength == 0.7


def test_loras_list_accepts_weight_and_scale_aliases():
    request = GenerationRequest.model_validate(
        {
            "prompt": "p",
            "loras": [{"name": "a.safetensors", "weight": 0.5}, {"id": "b", "scale": 2}],
        }
    )
    assert [s.strength for s in request.lora_stack()] == [0.5, 2.0]


def test_guidance_scale_is_an_alias_of_cfg():
    assert GenerationRequest.model_validate({"prompt": "p", "guidance_scale": 4.5}).cfg == 4.5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "p", "lora_strength": 2.5}, "lora_strength"),
        ({"prompt": "p", "width": 10000}, "width"),
        ({"prompt": "p", "steps": 0}, "steps"),
        ({"prompt": "p", "bogus": 1}, "bogus"),
        ({"prompt": "p", "loras": [{"name": "a.safetensors", "strength": -1}]}, "strength"),
        ({"prompt": "p", "loras": [{"id": "a"}] * 5}, "loras"),
        ({"prompt": "p", "lora_id": "../x"}, "lora_id"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_out_of_range_fields_are_named(body, field):
    with pytest.raises(ValidationError) as info:
        GenerationRequest.model_validate(body)
    assert field in str(info.value)


def test_trigger_words_are_prepended_once():
    assert prompt_with_triggers("a woman in a garden", ["ohwx woman", None, "ohwx woman"]) == (
        "ohwx woman, a woman in a garden"
    )
    assert prompt_with_triggers("ohwx woman in a garden", ["ohwx woman"]) == (
        "ohwx woman in a garden"
    )


def test_a_relative_lora_root_is_made_absolute():
    config = AppConfig.model_validate(
        {"lora_root": "./models/loras", "models": [{"name": "flux", "family": "flux"}]}
    )
    assert Path(config.lora_root).is_absolute()
    remote = AppConfig.model_validate(
        {"lora_root": "s3://b/loras", "models": [{"name": "flux", "family": "flux"}]}
    )
    assert remote.lora_root == "s3://b/loras"


def test_config_overrides_only_the_defaults_it_names():
    config = AppConfig.model_validate(
        {"models": [{"name": "flux", "family": "flux", "defaults": {"steps": 4}}]}
    )
    defaults = config.models[0].generation_defaults()
    assert (defaults.steps, defaults.width, defaults.cfg) == (4, 1024, 3.5)


def test_unknown_family_is_refused_with_its_name():
    with pytest.raises(ValidationError, match="unknown family 'nope'"):
        AppConfig.model_validate({"models": [{"name": "x", "family": "nope"}]})


@pytest.mark.parametrize("name", ["local.yaml", "production.yaml"])
def test_cluster_configs_are_valid_serve_and_app_configs(name):
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load((REPO_ROOT / "cluster" / name).read_text())
    ServeDeploySchema.model_validate(serve_config)
    for application in serve_config["applications"]:
        config = AppConfig.model_validate(application["args"])
        deployments = {d["name"] for d in application["deployments"]}
        assert {m.name for m in config.models} | {"Ingress"} == deployments
