"""Start loraplex inside a load-test process: its own local Ray cluster, Serve on 127.0.0.1.

`serve run` would join whatever Ray cluster it finds; a benchmark wants one of its own, sized
for it, and gone when it ends. The app is built as `serve.app:build_app` builds it, with the
Serve config file's `deployments:` options (replicas, CPUs, queue bounds) applied by name.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import yaml

ENV_PASSED = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "MKL_CBWR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(num_cpus: int, env_vars: dict[str, str]) -> str:
    """A fresh local Ray cluster and Serve's HTTP proxy on a free 127.0.0.1 port; its URL."""
    import ray
    from ray import serve

    ray.init(
        address="local",  # never join another cluster running on the machine
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env_vars},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def deploy(
    app_args: dict, options: dict[str, dict], app_name: str, route_prefix: str = "/"
) -> None:
    """The loraplex app of `app_args` (serve.config.AppConfig) under `app_name` at
    `route_prefix`, each deployment with `options[name]` (Serve deployment options); waits
    until it is ready."""
    from ray import serve

    from serve.app import model_args, model_deployment
    from serve.config import AppConfig
    from serve.ingress import Ingress

    config = AppConfig.model_validate(app_args)
    deployment = model_deployment()
    handles = {
        model.name: deployment.options(name=model.name, **options.get(model.name, {})).bind(
            *model_args(config, model)
        )
        for model in config.models
    }
    ingress = Ingress.options(**options.get("Ingress", {}))
    serve.run(
        ingress.bind(config.model_dump(mode="json"), handles),
        name=app_name,
        route_prefix=route_prefix,
    )


def read_config(path: Path) -> tuple[dict, dict[str, dict], dict[str, str]]:
    """A Serve config file's first application: (args, deployment options by name, env vars)."""
    application = yaml.safe_load(path.read_text())["applications"][0]
    options = {}
    for entry in application.get("deployments", []):
        entry = dict(entry)
        options[entry.pop("name")] = entry
    env_vars = application.get("runtime_env", {}).get("env_vars", {})
    return application["args"], options, env_vars


def replica_states(url: str) -> dict[str, list[dict]]:
    """Each model's replicas as /models reports them (hot adapters, loads, hits, memory)."""
    models = httpx.get(f"{url}/models", timeout=60).json()["models"]
    return {model["name"]: model["replicas"] for model in models}
