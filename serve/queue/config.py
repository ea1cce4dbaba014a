"""The `queue` section of the app config: where queued requests live and how they are run."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.outbound import UrlRules


class QueueConfig(BaseModel):
    """POST /queue/<endpoint>: durable requests, run by the ingress replicas, with webhooks."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(
        default="./models/queue",
        max_length=2048,
        description="fsspec URI or local folder where queued requests, their status and their "
        "results are kept (under <root>/<app name>/). Every ingress replica must reach it.",
    )
    max_queued: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Requests each deployment's queue holds (queued or running); the next is "
        "answered 503 overloaded with Retry-After.",
    )
    max_running: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="Queued requests of one deployment each ingress replica runs at once.",
    )
    result_retention_s: int = Field(
        default=24 * 3600,
        ge=10,
        le=90 * 24 * 3600,
        description="How long a finished request (its status and result) is kept.",
    )
    lease_s: float = Field(
        default=30.0,
        ge=1.0,
        le=3600.0,
        description="A running request's claim, renewed while it runs: a request whose "
        "ingress replica stopped is run again by another once its lease lapses.",
    )
    poll_s: float = Field(
        default=0.5,
        ge=0.05,
        le=60.0,
        description="How often each ingress replica looks for queued requests it can run.",
    )
    webhook_secret_env: str = Field(
        default="LORAPLEX_WEBHOOK_SECRET",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="The environment variable holding the webhook signing secret; without "
        "it, a request with webhook_url is refused.",
    )
    webhook_retry_s: float = Field(
        default=300.0,
        ge=0.0,
        le=24 * 3600.0,
        description="How long a failing webhook delivery is retried, with backoff.",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0.0, le=120.0)
    webhooks: UrlRules = Field(
        default_factory=UrlRules,
        description="Which webhook URLs are allowed: schemes, hosts, ports, and no loopback, "
        "private or link-local address unless allowed (as for LoRA URLs).",
    )

    @field_validator("root")
    @classmethod
    def _absolute_local_root(cls, root: str) -> str:
        # Replicas may run with another working directory: pin a relative local path now.
        return root if "://" in root else os.path.abspath(root)

    def webhook_secret(self) -> str | None:
        return os.environ.get(self.webhook_secret_env) or None
