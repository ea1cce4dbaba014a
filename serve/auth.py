"""API keys: who a request speaks for (its principal), the scope each route needs, and the
refusal to serve anonymously on a public address.

An `api_keys` entry is a plain string (every scope, no tenant) or an `ApiKey` with scopes and
optionally a tenant. The ingress's middleware finds the principal once per request; a route
states its scope in its signature (`principal: CanWriteLoras`), and a principal without that
scope is refused with 403 `forbidden` before the route reads its body.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.errors import Forbidden, Unauthorized

if TYPE_CHECKING:
    from serve.config import AppConfig

logger = logging.getLogger(__name__)

Scope = Literal["generate", "loras:read", "loras:write", "train", "admin"]
ALL_SCOPES: tuple[str, ...] = get_args(Scope)
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
MAX_KEY_CHARS = 512
LOOPBACK_NAMES = ("localhost",)


class ApiKey(BaseModel):
    """One key with its scopes, and the tenant whose LoRAs, datasets and jobs it is limited to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = Field(
        default=None, min_length=1, max_length=MAX_KEY_CHARS, description="The secret itself."
    )
    key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="The environment variable holding the secret (so the config file holds "
        "none); read when the app is built and by each ingress replica.",
    )
    scopes: tuple[Scope, ...] = Field(
        min_length=1, max_length=len(ALL_SCOPES), description=f"Any of {', '.join(ALL_SCOPES)}."
    )
    tenant: str | None = Field(
        default=None,
        pattern=TENANT_PATTERN,
        description="Limit the key to `tenants/<tenant>/` of each root, plus reading shared "
        "LoRAs and datasets (those outside tenants/).",
    )

    @model_validator(mode="after")
    def _one_secret_and_sound_scopes(self) -> ApiKey:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("key or key_env: give exactly one")
        if len(set(self.scopes)) != len(self.scopes):
            raise ValueError(f"scopes: listed twice in {list(self.scopes)}")
        if self.tenant is not None and "admin" in self.scopes:
            # /models shows every replica's hot adapters, every tenant's LoRA names among them.
            raise ValueError("scopes: admin is for keys without a tenant")
        return self

    def secret(self) -> str:
        """The key, from the environment for `key_env`; ValueError naming it when unset."""
        if self.key is not None:
            return self.key
        value = os.environ.get(str(self.key_env), "")
        if not value:
            raise ValueError(
                f"api_keys: key_env {self.key_env} is not set (or empty) in the ingress's "
                "environment; set it on every node that runs the ingress"
            )
        return value


PlainKey = Annotated[str, Field(min_length=1, max_length=MAX_KEY_CHARS)]


@dataclass(frozen=True)
class Principal:
    """What one request may do: its key's scopes, and its tenant (None: every tenant's)."""

    scopes: frozenset[str]
    tenant: str | None = None


EVERYTHING = Principal(frozenset(ALL_SCOPES))


def key_ring(config: AppConfig) -> list[tuple[str, Principal]]:
    """(secret, principal) for each configured key; ValueError for a key_env that is unset."""
    ring = []
    for entry in config.api_keys:
        if isinstance(entry, str):
            ring.append((entry, EVERYTHING))
        else:
            ring.append((entry.secret(), Principal(frozenset(entry.scopes), entry.tenant)))
    return ring


def principal_of(request: Request, config: AppConfig) -> Principal:
    """The request's principal; the key ring is built on this replica's first request (the
    FastAPI app a replica serves is its own copy) and kept on the app."""
    ring = getattr(request.app.state, "key_ring", None)
    if ring is None:
        ring = request.app.state.key_ring = key_ring(config)
    return authenticate(request, ring)


def authenticate(request: Request, ring: list[tuple[str, Principal]]) -> Principal:
    """The principal of the request's key (`Authorization: Bearer <key>` or `X-API-Key`);
    everything when no key is configured; Unauthorized for a missing or unknown key."""
    if not ring:
        return EVERYTHING
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if given:
        for secret, principal in ring:
            if secrets.compare_digest(given.encode(), secret.encode()):
                return principal
    raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")


def requires(scope: Scope):
    """A route dependency: the request's principal, which must hold `scope`."""

    async def principal_with_scope(request: Request) -> Principal:
        principal = getattr(request.state, "principal", None)
        if principal is None:  # the middleware sets it on every route but the public ones
            raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")
        if scope not in principal.scopes:
            raise Forbidden(
                f"scopes: this API key lacks the {scope} scope that "
                f"{request.method} {request.url.path} needs"
            )
        return principal

    principal_with_scope.scope = scope  # tests/test_scopes.py checks every route has one
    return Depends(principal_with_scope)


CanGenerate = Annotated[Principal, requires("generate")]
CanReadLoras = Annotated[Principal, requires("loras:read")]
CanWriteLoras = Annotated[Principal, requires("loras:write")]
CanTrain = Annotated[Principal, requires("train")]
IsAdmin = Annotated[Principal, requires("admin")]


def check_keys_at_start(config: AppConfig) -> None:
    """What `build_app` checks before deploying: every key_env is set, and an app without
    keys does not listen beyond this machine unless it says so."""
    key_ring(config)
    if not config.api_keys and not config.allow_anonymous:
        check_exposure(config, serve_http_host())


def check_exposure(config: AppConfig, host: str | None) -> None:
    """Refuse an app without keys whose proxies listen beyond this machine (Serve's
    http_options.host 0.0.0.0, say), unless its config says allow_anonymous: true."""
    if config.api_keys or config.allow_anonymous or host is None or is_loopback(host):
        return
    raise ValueError(
        f"api_keys: empty while Serve's http_options.host is {host}, which other machines "
        "reach; set api_keys, bind http_options.host to 127.0.0.1, or set allow_anonymous: "
        "true to serve without keys on purpose"
    )


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: other machines may resolve it to this one


def serve_http_host() -> str | None:
    """The address Serve's proxies listen on, as Ray's Serve REST API (on the dashboard)
    reports the running instance's http_options; None when it cannot be asked."""
    import httpx
    import ray
    from ray.job_submission import JobSubmissionClient

    if not ray.is_initialized():
        return None
    try:
        dashboard = JobSubmissionClient(ray.get_runtime_context().gcs_address).get_address()
        details = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10).json()
        return (details.get("http_options") or {}).get("host")
    except (ConnectionError, RuntimeError, ValueError, httpx.HTTPError) as e:
        logger.warning("could not learn Serve's http_options.host (%s); not checked", e)
        return None
