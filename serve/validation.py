"""Client input validated by a pydantic model, refusals as InvalidRequest naming the field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    return describe_errors(error.errors())


def describe_errors(errors: Sequence[Mapping]) -> str:
    """The same for pydantic's error dicts, wherever they come from (FastAPI's parameters)."""
    parts = []
    for item in errors:
        field = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{field}: {item['msg']}")
    return "; ".join(parts)
