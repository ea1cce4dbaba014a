"""build_app: the Serve application builder named in cluster/*.yaml (`serve.app:build_app`)."""

from __future__ import annotations

from ray import serve

from deployments.base import DiffusionDeployment
from serve.config import AppConfig
from serve.ingress import Ingress


def build_app(args: dict) -> serve.Application:
    """One DiffusionDeployment per configured model, named after it, behind one Ingress."""
    config = AppConfig.model_validate(args)
    deployment = serve.deployment(DiffusionDeployment)
    handles = {
        model.name: deployment.options(name=model.name).bind(
            model.model_dump(mode="json"),
            config.lora_root,
            config.remote_loras.model_dump(mode="json"),
        )
        for model in config.models
    }
    return Ingress.bind(config.model_dump(mode="json"), handles)
