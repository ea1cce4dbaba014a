"""API keys: checked before any route, constant-time, Bearer or X-API-Key."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from deployments.errors import Unauthorized
from serve.ingress import _check_api_key


def request_with(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/flux", "headers": raw})


@pytest.mark.parametrize(
    "headers", [{"Authorization": "Bearer k1"}, {"authorization": "bearer k2"}, {"X-API-Key": "k1"}]
)
def test_a_configured_key_is_accepted(headers):
    _check_api_key(request_with(headers), ["k1", "k2"])


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}, {"X-API-Key": ""}]
)
def test_a_missing_or_wrong_key_is_refused(headers):
    with pytest.raises(Unauthorized):
        _check_api_key(request_with(headers), ["k1", "k2"])
