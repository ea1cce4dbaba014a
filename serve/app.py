"""build_app: the Serve application builder named in cluster/*.yaml (`serve.app:build_app`)."""

from __future__ import annotations

import logging

import ray
from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from deployments.base import DiffusionDeployment
from deployments.config import ModelConfig
from serve.adapter_router import ROUTER_RAY_VERSIONS, AdapterAffinityRouter, router_supported
from serve.auth import check_keys_at_start
from serve.config import AppConfig
from serve.ingress import REFUSAL_HEADROOM, RETRY_AFTER_S, Ingress
from serve.registry import registry_for


def model_deployment() -> serve.Deployment:
    """DiffusionDeployment as a Serve deployment, routed by adapter (serve/adapter_router.py).
    A Serve config's `deployments:` entry may still override any option, the router too.
    Under a Ray the router was not tested with, Serve's default router, with a warning: the
    router needs Serve's routing loop of Ray 2.60 (see its module)."""
    if not router_supported(ray.__version__):
        logging.getLogger(__name__).warning(
            "Ray %s: routing by adapter needs Ray %s; using Serve's default router",
            ray.__version__,
            " or ".join(ROUTER_RAY_VERSIONS),
        )
        return serve.deployment(DiffusionDeployment)
    return serve.deployment(
        DiffusionDeployment,
        request_router_config=RequestRouterConfig(request_router_class=AdapterAffinityRouter),
    )


def model_args(config: AppConfig, model: ModelConfig) -> tuple:
    """DiffusionDeployment's arguments for one model of the app, in the JSON form Serve passes."""
    return (
        model.model_dump(mode="json"),
        config.lora_root,
        config.remote_loras.model_dump(mode="json"),
        config.lora_root_cache.model_dump(mode="json"),
        # Replicas report to the app's registry from their first moment: they create it if
        # they start before the ingress does.
        registry_for,
    )


# Serve's own 503s (its proxy's, for a full ingress queue) carry Retry-After as loraplex's do.
RETRY_AFTER = BackpressureConfig(retry_after_s=RETRY_AFTER_S)


def build_app(args: dict) -> serve.Application:
    """One DiffusionDeployment per configured model, named after it, behind one Ingress.
    Queue bounds come from `back_pressure`; the Serve config's `deployments:` section may
    still set any of them."""
    config = AppConfig.model_validate(args)
    check_keys_at_start(config)  # here: a refusal fails the deploy with its message
    limits = config.back_pressure
    deployment = model_deployment()
    handles = {
        model.name: deployment.options(
            name=model.name,
            max_queued_requests=limits.model_max_queued_requests,
            backpressure_config=RETRY_AFTER,
        ).bind(*model_args(config, model))
        for model in config.models
    }
    ingress = Ingress.options(
        max_ongoing_requests=limits.ingress_max_ongoing_requests + REFUSAL_HEADROOM,
        max_queued_requests=limits.ingress_max_queued_requests,
        backpressure_config=RETRY_AFTER,
    )
    return ingress.bind(config.model_dump(mode="json"), handles)
