"""Scopes over real HTTP: each route needs its scope (403 `forbidden` naming it otherwise), a
bad or missing key is 401, and every route of the app declares a scope."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from tests.keyed_app import ENV_KEY, KEY_ENV, as_key, keyed_app

# Starts an app of its own: left out of `make test-fast`.
pytestmark = pytest.mark.slow

UNKNOWN_UPLOAD = "0" * 32
UNKNOWN_JOB = "train-" + "0" * 32
# (method, path, body, scope, status with the scope): bodies that fail cheaply once the scope
# has let them through, so a table of requests stays quick.
ROUTES = [
    ("POST", "/flux", {}, "generate", 422),
    ("POST", "/flux-lora", {"prompt": "x"}, "generate", 400),
    ("GET", "/loras", None, "loras:read", 200),
    ("GET", "/datasets/none", None, "loras:read", 404),
    ("PUT", "/loras/x.safetensors", b"not a lora", "loras:write", 422),
    ("DELETE", "/loras/none.safetensors", None, "loras:write", 404),
    ("POST", "/loras/merge", {}, "loras:write", 422),
    ("POST", "/loras/uploads", {}, "loras:write", 422),
    ("GET", f"/loras/uploads/{UNKNOWN_UPLOAD}", None, "loras:write", 404),
    ("DELETE", f"/loras/uploads/{UNKNOWN_UPLOAD}", None, "loras:write", 404),
    ("PUT", "/datasets/x", {}, "loras:write", 422),
    ("DELETE", "/datasets/none", None, "loras:write", 404),
    ("POST", "/train", {}, "train", 422),
    ("GET", "/train", None, "train", 200),
    ("GET", f"/train/{UNKNOWN_JOB}", None, "train", 404),
    ("GET", f"/train/{UNKNOWN_JOB}/logs", None, "train", 404),
    ("DELETE", f"/train/{UNKNOWN_JOB}", None, "train", 404),
    ("GET", "/models", None, "admin", 200),
    ("GET", "/playground/models", None, "generate", 200),
    ("POST", "/v1/images/generations", {}, "generate", 422),
    ("GET", "/v1/models", None, "generate", 200),
]
ONE_SCOPE_KEYS = {
    "generate": "gen-key",
    "loras:read": "read-key",
    "loras:write": "write-key",
    "train": "train-key",
    "admin": "admin-key",
}


@pytest.fixture(scope="module")
def app(service, ray_cluster, lora_root, tmp_path_factory):
    keys = [{"key": key, "scopes": [scope]} for scope, key in ONE_SCOPE_KEYS.items()]
    keys += ["plain-key", {"key_env": KEY_ENV, "scopes": ["loras:read"]}]
    folder = tmp_path_factory.mktemp("scopes")
    with keyed_app(ray_cluster, lora_root, folder, "scoped", keys) as client:
        yield client


def send(client, method: str, path: str, body, key: str):
    content = body if isinstance(body, bytes) else None
    json = body if isinstance(body, dict) else None
    return client.request(method, path, content=content, json=json, headers=as_key(key))


def test_every_route_but_the_public_ones_declares_a_scope():
    from serve.ingress import PUBLIC_PATHS, app

    # FastAPI keeps included routers whole in app.routes; iter_route_contexts opens them.
    routes = [
        context.original_route
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute)
    ]
    assert len(routes) > 20  # the check below must see the routers' routes
    unscoped = [
        f"{sorted(route.methods)} {route.path}"
        for route in routes
        if route.path not in PUBLIC_PATHS
        and not any(hasattr(dep.call, "scope") for dep in route.dependant.dependencies)
    ]
    assert unscoped == []


def test_each_route_needs_its_scope(app):
    wrong = []
    for method, path, body, scope, allowed_status in ROUTES:
        for key_scope, key in ONE_SCOPE_KEYS.items():
            response = send(app, method, path, body, key)
            expected = allowed_status if key_scope == scope else 403
            if response.status_code != expected:
                wrong.append(f"{key_scope} key: {method} {path}: {response.status_code}")
            elif expected == 403:
                error = response.json()["error"]
                assert error["code"] == "forbidden"
                assert f"lacks the {scope} scope" in error["message"], error
    assert wrong == []


def test_a_plain_key_has_every_scope(app):
    for method, path, body, _scope, allowed_status in ROUTES:
        response = send(app, method, path, body, "plain-key")
        assert response.status_code == allowed_status, (method, path, response.text)


def test_a_key_from_the_environment_works(app):
    assert app.get("/loras", headers=as_key(ENV_KEY)).status_code == 200
    assert app.get("/train", headers=as_key(ENV_KEY)).status_code == 403


@pytest.mark.parametrize("headers", [{}, as_key("wrong"), {"X-API-Key": "gen-ke"}])
def test_a_bad_or_missing_key_is_401(app, headers):
    response = app.get("/loras", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_serve_reports_where_its_proxies_listen(app):
    from serve.auth import serve_http_host

    assert serve_http_host() == "127.0.0.1"  # the session's serve.start(http_options=...)
