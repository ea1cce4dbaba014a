"""A second app beside the session's, with API keys: just an ingress, under a route prefix of its
own, sending generations and LoRA checks to the session app's flux deployment and sharing its
LoRA root (so a file one app writes is the file the flux replica loads)."""

from __future__ import annotations

import contextlib
from pathlib import Path

KEY_ENV = "LORAPLEX_TEST_ENV_KEY"
ENV_KEY = "key-from-the-environment"


@contextlib.contextmanager
def keyed_app(ray_cluster: str, lora_root: Path, folder: Path, name: str, api_keys: list):
    """An httpx client for the app `name` (at /<name>) with these api_keys; removed after."""
    import httpx
    from ray import serve

    from serve.config import AppConfig
    from serve.ingress import Ingress

    config = AppConfig.model_validate(
        {
            "lora_root": str(lora_root),
            "dataset_root": str(folder / "datasets"),
            "train_storage_path": str(folder / "train"),
            "models": [{"name": "flux", "family": "flux"}],
            "api_keys": api_keys,
        }
    )
    flux = serve.get_deployment_handle("flux", app_name="loraplex")
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {KEY_ENV: ENV_KEY}}}
    )
    serve.run(
        ingress.bind(config.model_dump(mode="json"), {"flux": flux}),
        name=name,
        route_prefix=f"/{name}",
    )
    try:
        with httpx.Client(base_url=f"{ray_cluster}/{name}", timeout=300) as client:
            yield client
    finally:
        serve.delete(name)


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
