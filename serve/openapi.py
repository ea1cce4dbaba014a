"""The API description (`/openapi.json`) as the API answers: bodies, errors and their schemas.

Several routes read their bodies by hand (uploads are raw bytes; the generation body's model
depends on the endpoint's family), so FastAPI cannot see them: `json_body` and `RAW_BODY`
declare them, and `describe_api` puts the models' schemas, and the schemas they refer to, into
`components.schemas`, where the `$ref`s point. A route on `{endpoint}` that declares
`ENDPOINT_BODY` is described once per configured endpoint, as the running config serves it:
`/flux`, `/flux-lora`, ..., each with its family's body and its model's defaults. Every route
declares the error statuses it can answer with loraplex's error body (`error_responses`).
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from deployments.family import get_family
from deployments.schemas import EditRequest

if TYPE_CHECKING:
    from deployments.config import ModelConfig
    from serve.config import AppConfig

REF_TEMPLATE = "#/components/schemas/{model}"

# Component schemas FastAPI does not see (the error body, the bodies routes read by hand), by
# name: filled as routes declare them.
_SCHEMAS: dict[str, dict] = {}

_ERROR_DESCRIPTIONS = {
    400: "`lora_required`: a `-lora` endpoint got no LoRA.",
    401: "`unauthorized`: API keys are configured and the request has no valid one.",
    403: "`forbidden`: the key's scopes or tenant do not cover this route or resource.",
    404: "`not_found`, `lora_not_found`: no such route, file, upload, dataset or job.",
    409: "`conflict`: a name taken, an upload at the wrong offset, a dataset in use.",
    413: "`too_large`: a body, image, file or JSON item count over its limit.",
    422: "`invalid_request`, `lora_incompatible`: the message names the field.",
    500: "`internal`: a bug, never a client's input; logged with its traceback.",
    502: "`lora_fetch_failed`: a LoRA URL could not be fetched.",
    503: "`overloaded`, `replica_unavailable`, `job_server_unavailable`; `Retry-After` is set.",
}
# What any route can answer: a key check, a declared body over the limit, a path or query
# parameter refused, a full ingress or a lost replica, and the last-resort 500.
COMMON_ERRORS = (401, 403, 404, 413, 422, 500, 503)


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable name, e.g. `invalid_request`.")
    message: str = Field(description="What went wrong; names the field where there is one.")


class ErrorBody(BaseModel):
    """Every error loraplex answers: `{"error": {"code": ..., "message": ...}}`."""

    error: ErrorDetail


_SCHEMAS["ErrorDetail"] = ErrorDetail.model_json_schema()
_SCHEMAS["ErrorBody"] = ErrorBody.model_json_schema(ref_template=REF_TEMPLATE)
_SCHEMAS["ErrorBody"].pop("$defs")
# As JSON whatever the route's own media type (FastAPI would give a `model` a route's
# text/plain or image/png).
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(model="ErrorBody")}}}


def error_responses(*extra: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a router: COMMON_ERRORS and `extra`, each with the error body."""
    return {
        status: {
            "description": _ERROR_DESCRIPTIONS[status],
            "content": copy.deepcopy(_ERROR_CONTENT),
        }
        for status in sorted({*COMMON_ERRORS, *extra})
    }


def json_body(
    *models: type[BaseModel], name: str | None = None, drop: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON body of one of `models` (the first under `name` if
    given, without the properties in `drop`: fields the server fills in)."""
    refs = []
    for index, model in enumerate(models):
        schema = model.model_json_schema(ref_template=REF_TEMPLATE)
        for ref_name, definition in schema.pop("$defs", {}).items():
            _SCHEMAS.setdefault(ref_name, definition)
        for field in drop:
            schema.get("properties", {}).pop(field, None)
            if field in schema.get("required", []):
                schema["required"].remove(field)
        component = (name if index == 0 and name else None) or model.__name__
        _SCHEMAS[component] = schema
        refs.append({"$ref": REF_TEMPLATE.format(model=component)})
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


RAW_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# `openapi_extra` of a route on `{endpoint}` whose body is its endpoint's generation body.
_ENDPOINT_MARK = "x-loraplex-endpoint-body"
ENDPOINT_BODY = {_ENDPOINT_MARK: True}
ENDPOINT_PARAMETER = "endpoint"
# The fields of a generation body whose default is the model's (GenerationDefaults); an edit
# model's size is its input image's.
_SIZE_FIELDS = ("width", "height")


def describe_api(app: FastAPI, config: AppConfig) -> dict[str, Any]:
    """FastAPI's description of `app` serving `config`: the hand-read bodies' schemas in its
    components, and each `ENDPOINT_BODY` route once per configured endpoint."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
        servers=app.servers,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, body_schema in _SCHEMAS.items():
        components.setdefault(name, body_schema)
    schema["paths"] = _per_endpoint(schema["paths"], config, components)
    return schema


def _per_endpoint(paths: dict, config: AppConfig, components: dict) -> dict:
    """`paths` with each marked operation on a `{endpoint}` path replaced by one per endpoint
    of `config` (`/<endpoint>` and `/<endpoint>-lora`), in the order of the paths."""
    described: dict[str, dict] = {}
    placeholder = "{" + ENDPOINT_PARAMETER + "}"
    for path, item in paths.items():
        for method, operation in list(item.items()):
            if placeholder not in path or not operation.pop(_ENDPOINT_MARK, False):
                continue
            del item[method]
            for model in config.models:
                body = {"$ref": REF_TEMPLATE.format(model=_endpoint_body(model, components))}
                for lora_required in (False, True):
                    endpoint = model.endpoint + ("-lora" if lora_required else "")
                    concrete = path.replace(placeholder, endpoint)
                    described.setdefault(concrete, {})[method] = _endpoint_operation(
                        operation, method, concrete, model, lora_required, body
                    )
        if item:
            described.setdefault(path, {}).update(item)
    return described


def _endpoint_operation(
    template: dict, method: str, path: str, model: ModelConfig, lora_required: bool, body: dict
) -> dict[str, Any]:
    """The template operation as `method path` of one endpoint: its body, its media type, no
    path parameter."""
    family = get_family(model.family)
    operation = copy.deepcopy(template)
    parameters = [p for p in operation.pop("parameters", []) if p["name"] != ENDPOINT_PARAMETER]
    if parameters:
        operation["parameters"] = parameters
    operation["operationId"] = re.sub(r"[^A-Za-z0-9]+", "_", f"{method}{path}")
    operation["summary"] = f"{template.get('summary', '')} ({model.name})".strip()
    needs = "A LoRA is required." if lora_required else "LoRAs are optional."
    operation["description"] = (
        f"The {model.name} deployment ({family.name}), answering {family.media_type}. {needs} "
        "Absent fields take the defaults shown: the model's, from its config."
    )
    operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    media = operation.get("responses", {}).get("200", {}).get("content", {})
    if family.media_type in media:  # the template lists every family's media types
        operation["responses"]["200"]["content"] = {family.media_type: media[family.media_type]}
    return operation


def _endpoint_body(model: ModelConfig, components: dict) -> str:
    """The component name of `model`'s generation body, with its defaults, added if new."""
    request_model = get_family(model.family).request_model
    name = f"{request_model.__name__}_{model.name}"
    if name in components:
        return name
    schema = request_model.model_json_schema(ref_template=REF_TEMPLATE)
    for ref_name, definition in schema.pop("$defs", {}).items():
        components.setdefault(ref_name, definition)
    sized_by_image = issubclass(request_model, EditRequest)
    for field, value in model.generation_defaults().model_dump().items():
        prop = schema["properties"].get(field)
        if prop is None or value is None or (sized_by_image and field in _SIZE_FIELDS):
            continue
        prop["default"] = value
    schema["title"] = f"{request_model.__name__} ({model.name})"
    components[name] = schema
    return name
