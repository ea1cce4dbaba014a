"""The API description is the API: schemathesis generates requests from `/openapi.json` for
every operation and checks each answer against it: no 5xx, every status and content type
declared, every body matching its declared schema. Plus what the description itself must
hold: every `$ref` resolves, every body is declared, one error format for 404s and 405s.

Against tests/small_app.py's app (roots of its own, so generated uploads, datasets and
deletions touch no other test's files). Generation requests go to its Flux endpoint with
steps and sizes clamped (at most 2 steps, 64x64, 5 frames): a generated 2048x2048 render at
150 steps would take minutes on a CPU. LORAPLEX_FUZZ_EXAMPLES sets the examples per
operation (default 8, derandomized, so a run is the same each time), LORAPLEX_FUZZ_PHASES
schemathesis's phases (default examples,fuzzing).
"""

from __future__ import annotations

import os
import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import REPO_ROOT
from tests.small_app import MODELS, small_app

EXAMPLES = int(os.environ.get("LORAPLEX_FUZZ_EXAMPLES", "8"))
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]
CLAMPS = {"steps": 2, "width": 64, "height": 64, "length": 5, "n": 2}
# The small app's generation paths (its Flux model's endpoints) and the OpenAI images API.
GENERATING = ("/flux", "/flux-lora", "/v1/images/generations")
SMALL_SIZE = "64x64"


@pytest.fixture(scope="module")
def small(ray_cluster, tmp_path_factory):
    with small_app(ray_cluster, tmp_path_factory.mktemp("api-schema")) as url:
        yield url


def _description() -> dict:
    from serve.config import AppConfig
    from serve.ingress import app
    from serve.openapi import describe_api

    return describe_api(app, AppConfig.model_validate({"models": MODELS}))


# The description as the ingress builds it, which the app serves (checked below): loaded here
# rather than over HTTP, as schemathesis's lazy fixture loader fails under pytest 9.
schema = schemathesis.openapi.from_dict(_description())
# The coverage phase (every field's boundary values: about 750 generation bodies, each a
# render) is for the long run by hand (docs/api.md); the bounded run generates and mutates.
PHASES = os.environ.get("LORAPLEX_FUZZ_PHASES", "examples,fuzzing").split(",")
schema.config.phases.update(phases=PHASES)


def _bounded(case) -> None:
    """A generation case as cheap renders on the app's Flux model."""
    if case.path in GENERATING and isinstance(case.body, dict):
        for field, most in CLAMPS.items():
            if isinstance(case.body.get(field), int) and case.body[field] > most:
                case.body[field] = most
        size = case.body.get("size")
        if isinstance(size, str) and re.fullmatch(r"\d+x\d+", size) and size != SMALL_SIZE:
            case.body["size"] = SMALL_SIZE


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_matches_the_description(case, small):
    _bounded(case)
    response = case.call_and_validate(base_url=small, checks=CHECKS, timeout=120)
    if os.environ.get("LORAPLEX_FUZZ_LOG"):  # one line per request, for the long run's table
        with open(os.environ["LORAPLEX_FUZZ_LOG"], "a") as log:
            log.write(f"{case.method} {case.path} {response.status_code}\n")


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_description_resolves_and_declares_bodies_and_errors():
    description = _description()
    components = description["components"]["schemas"]
    refs = _refs(description)
    assert "#/components/schemas/LoraSpec" in refs
    assert [r for r in refs if r.split("/")[-1] not in components] == []
    assert not [r for r in refs if not r.startswith("#/components/schemas/")]
    operations = [
        (method, path, operation)
        for path, item in description["paths"].items()
        for method, operation in item.items()
    ]
    for method, path, operation in operations:
        if method in ("put", "post") and not path.endswith("/complete"):
            assert operation.get("requestBody"), f"{method} {path} declares no body"
        for status in ("401", "404", "413", "422", "500", "503"):
            error = operation["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)
    bodies = {
        (m, p): list(o["requestBody"]["content"]) for m, p, o in operations if "requestBody" in o
    }
    assert bodies[("put", "/loras/{name}")] == ["application/octet-stream"]
    assert bodies[("put", "/datasets/{name}")] == ["application/json", "multipart/form-data"]
    train = components["TrainRequest"]["properties"]
    assert "lora_root" not in train and "base_model" in train  # the server's paths left out


def test_each_endpoint_is_described_with_its_own_body_and_defaults():
    import yaml

    from serve.config import AppConfig
    from serve.ingress import app
    from serve.openapi import describe_api

    local = yaml.safe_load((REPO_ROOT / "cluster" / "local.yaml").read_text())
    args = local["applications"][0]["args"]
    args["models"][0]["defaults"] = {"steps": 4}  # a config's override is the default shown
    config = AppConfig.model_validate(args)
    description = describe_api(app, config)
    paths, components = description["paths"], description["components"]["schemas"]
    assert "/{endpoint}" not in paths
    for endpoint in [f"/{model.endpoint}" for model in config.models]:
        plain, lora = paths[endpoint]["post"], paths[f"{endpoint}-lora"]["post"]
        assert plain["requestBody"] == lora["requestBody"]
        assert "A LoRA is required" in lora["description"]
    assert list(paths["/z-image"]["post"]["responses"]["200"]["content"]) == ["image/jpeg"]

    def body(path: str) -> dict:
        ref = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        return components[ref["$ref"].split("/")[-1]]["properties"]

    defaults = {field: schema.get("default") for field, schema in body("/flux").items()}
    assert defaults | {"width": 1024, "height": 1024, "steps": 4, "cfg": 3.5} == defaults
    video = {field: schema.get("default") for field, schema in body("/wan2.6").items()}
    assert (video["width"], video["height"], video["length"], video["fps"]) == (832, 480, 33, 16)
    edit = body("/qwen-image-edit")
    assert "image" in edit and edit["width"]["default"] is None and edit["steps"]["default"] == 50


@pytest.mark.slow
def test_one_error_format_for_routes_methods_and_names(small):
    with httpx.Client(base_url=small, timeout=60) as client:
        served = client.get("/openapi.json").json()
        assert served.pop("servers") == [{"url": "/small"}]
        assert served == _description()
        missing = client.get("/no/such/route")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        wrong_method = client.get("/flux")
        assert wrong_method.status_code == 405
        assert wrong_method.headers["allow"] == "POST"
        assert wrong_method.json()["error"] == {
            "code": "method_not_allowed",
            "message": "GET /small/flux: not allowed; use POST",
        }
        bad_query = client.get("/train/x/logs", params={"lines": "many"})
        assert bad_query.status_code == 422
        assert bad_query.json()["error"]["message"].startswith("lines: ")
        # A name no PUT could write is the same 422 for DELETE, not a 404.
        for method in ("PUT", "DELETE"):
            response = client.request(method, "/loras/..%2f")
            assert response.status_code == 422, response.text
            assert response.json()["error"]["message"].startswith("name: '../'")
