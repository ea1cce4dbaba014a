"""API keys without Serve: Bearer or X-API-Key, key entries with scopes and tenants, keys from
the environment, and the refusal to serve anonymously beyond this machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from starlette.requests import Request

from deployments.errors import Unauthorized
from serve.auth import ALL_SCOPES, EVERYTHING, Principal, authenticate, check_exposure, key_ring
from serve.config import AppConfig

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
MODELS = [{"name": "flux", "family": "flux"}]


def request_with(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/flux", "headers": raw})


def config_with(**fields) -> AppConfig:
    return AppConfig.model_validate({"models": MODELS, **fields})


def ring_of(*api_keys) -> list:
    return key_ring(config_with(api_keys=list(api_keys)))


@pytest.mark.parametrize(
    "headers", [{"Authorization": "Bearer k1"}, {"authorization": "bearer k2"}, {"X-API-Key": "k1"}]
)
def test_a_configured_key_is_accepted(headers):
    assert authenticate(request_with(headers), ring_of("k1", "k2")) == EVERYTHING


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}, {"X-API-Key": ""}]
)
def test_a_missing_or_wrong_key_is_refused(headers):
    with pytest.raises(Unauthorized):
        authenticate(request_with(headers), ring_of("k1", "k2"))


def test_no_keys_means_every_scope_and_no_tenant():
    assert authenticate(request_with({}), ring_of()) == EVERYTHING
    assert EVERYTHING.scopes == frozenset(ALL_SCOPES) and EVERYTHING.tenant is None


def test_a_key_entry_carries_its_scopes_and_tenant():
    ring = ring_of("plain", {"key": "acme-key", "scopes": ["generate"], "tenant": "acme"})
    principal = authenticate(request_with({"X-API-Key": "acme-key"}), ring)
    assert principal == Principal(frozenset({"generate"}), "acme")
    assert authenticate(request_with({"X-API-Key": "plain"}), ring) == EVERYTHING


def test_a_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORAPLEX_TEST_KEY", "from-env")
    ring = ring_of({"key_env": "LORAPLEX_TEST_KEY", "scopes": ["loras:read"]})
    principal = authenticate(request_with({"Authorization": "Bearer from-env"}), ring)
    assert principal.scopes == frozenset({"loras:read"})
    monkeypatch.delenv("LORAPLEX_TEST_KEY")
    with pytest.raises(ValueError, match="key_env LORAPLEX_TEST_KEY is not set"):
        ring_of({"key_env": "LORAPLEX_TEST_KEY", "scopes": ["loras:read"]})


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"scopes": ["generate"]}, "key or key_env"),
        ({"key": "k", "key_env": "K", "scopes": ["generate"]}, "key or key_env"),
        ({"key": "k", "scopes": []}, "scopes"),
        ({"key": "k", "scopes": ["delete-everything"]}, "scopes"),
        ({"key": "k", "scopes": ["train", "train"]}, "scopes"),
        ({"key": "k", "scopes": ["admin"], "tenant": "acme"}, "admin is for keys without"),
        ({"key": "k", "scopes": ["generate"], "tenant": "../acme"}, "tenant"),
        ({"key": "k", "scopes": ["generate"], "role": "root"}, "role"),
        ({"key": "", "scopes": ["generate"]}, "key"),
    ],
)
def test_a_bad_key_entry_is_refused_naming_the_field(entry, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        config_with(api_keys=[entry])


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", None])
def test_no_keys_on_this_machine_only_is_allowed(host):
    check_exposure(config_with(), host)


def test_no_keys_on_every_interface_is_refused_unless_said():
    with pytest.raises(ValueError) as refused:
        check_exposure(config_with(), "0.0.0.0")
    for field in ("api_keys", "http_options.host", "allow_anonymous"):
        assert field in str(refused.value)
    check_exposure(config_with(allow_anonymous=True), "0.0.0.0")
    check_exposure(config_with(api_keys=["k"]), "0.0.0.0")


def test_production_yaml_starts_with_keys_from_the_environment(monkeypatch):
    serve_config = yaml.safe_load((CLUSTER / "production.yaml").read_text())
    [app] = serve_config["applications"]
    config = AppConfig.model_validate(app["args"])
    for entry in config.api_keys:
        assert isinstance(entry, str) is False and entry.key is None, "no secret in the file"
        monkeypatch.setenv(entry.key_env, f"secret-of-{entry.key_env}")
    check_exposure(config, serve_config["http_options"]["host"])
    assert len(key_ring(config)) == len(config.api_keys) > 0
