"""The API description (`/openapi.json`) as the API answers: bodies, errors and their schemas.

Several routes read their bodies by hand (the generation body's model depends on the
endpoint's family; uploads are raw bytes), so FastAPI cannot see them: `json_body` and
`RAW_BODY` declare them, and `describe_api` puts the models' schemas, and the schemas they
refer to, into `components.schemas`, where the `$ref`s point. Every route declares the error
statuses it can answer with loraplex's error body (`error_responses`).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

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


def describe_api(app: FastAPI) -> dict[str, Any]:
    """FastAPI's description of `app`, with the hand-read bodies' schemas in its components.
    Built once, as FastAPI's own is."""
    if app.openapi_schema is None:
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
        app.openapi_schema = schema
    return app.openapi_schema
