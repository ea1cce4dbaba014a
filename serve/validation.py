"""Client input validated by a pydantic model, refusals as InvalidRequest naming the field."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from deployments.errors import InvalidRequest

Model = TypeVar("Model", bound=BaseModel)


def validated(model: type[Model], body: object) -> Model:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise InvalidRequest(describe_validation_error(e)) from e


def describe_validation_error(error: ValidationError) -> str:
    """`field: problem` for each error, the field as a dotted path (loras.0.strength)."""
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{field}: {item['msg']}")
    return "; ".join(parts)
