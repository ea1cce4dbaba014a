"""Shared fixtures: one Ray cluster and one Serve app per test session, tiny models only."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MKL picks GEMM code paths by memory alignment, so once peft has allocated its layers the same
# matmul can differ in the last bit; STRICT makes CPU results bitwise reproducible, which the
# "strength 0 is the base image" tests compare. MKL reads it at its first call, after this.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_ADAPTERS = 2  # small, so eviction is exercised
MAX_BODY_BYTES = 4 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster and Serve instance for every test that needs them."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # A head node of our own, rather than ray.init()'s: ray.init cannot move the dashboard
    # agent off its fixed port (52365), which another cluster on the machine may hold, and the
    # agent runs the jobs that `POST /train` submits.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            # Logical CPUs: the tiny replicas (one CPU each) and a 2-worker training job.
            "num_cpus": 16,
            "object_store_memory": 1024**3,
            "include_dashboard": True,  # the dashboard hosts Ray's job submission server
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
            # Workers report metrics to the node's Prometheus export every second rather than
            # every 10 s, so test_metrics.py sees a request's counts within a few seconds.
            "_system_config": {"metrics_report_interval_ms": 1000},
        },
    )
    ray.init(
        address=cluster.address,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                name: os.environ[name]
                for name in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "MKL_CBWR")
            }
        },
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def metrics_url(ray_cluster) -> str:
    """The head node's Prometheus endpoint (Ray picks its `metrics_export_port`)."""
    import ray

    [node] = ray.nodes()
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


@pytest.fixture(scope="session")
def tiny_pipelines():
    """family -> its tiny:// pipeline, built on first use (LoRA files need module shapes)."""
    from deployments import load_pipeline

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_pipeline(family, f"tiny://{family}")
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_flux(tiny_pipelines):
    return tiny_pipelines("flux")


def _family_lora(tiny_pipelines, family: str, seed: int) -> dict:
    from deployments.family import get_family
    from deployments.loras.synthetic import lora_tensors

    spec = get_family(family)
    denoiser = getattr(tiny_pipelines(family), spec.denoiser_component)
    return lora_tensors(denoiser, spec.denoiser_component, seed, targets=spec.lora_targets)


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory, tiny_pipelines):
    """A LoRA root with diffusers, other-model and broken files for every tiny family.

    Flux: character-a ... character-k and styles/ink, plus broken ones (corrupt, nomatch,
    sdxl, wide). Every family: character-<family>-a and -b.
    """
    import torch

    from deployments.family import FAMILY_NAMES
    from deployments.loras.synthetic import lora_tensors, write_lora

    root = tmp_path_factory.mktemp("loras")
    transformer = tiny_pipelines("flux").transformer
    for seed, lora_id in enumerate(["a", "b", "c", "d", "e", "f", "g", "h", "k"], start=1):
        write_lora(
            root / f"character-{lora_id}.safetensors",
            lora_tensors(transformer, "transformer", seed),
        )
    write_lora(root / "styles" / "ink.safetensors", lora_tensors(transformer, "transformer", 99))
    (root / "character-corrupt.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"
    )
    write_lora(
        root / "character-nomatch.safetensors",
        {
            "transformer.no_such_block.to_q.lora_A.weight": torch.ones(4, 8),
            "transformer.no_such_block.to_q.lora_B.weight": torch.ones(8, 4),
        },
    )
    write_lora(  # an SDXL-style UNet LoRA: another base model entirely
        root / "character-sdxl.safetensors",
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
    )
    wide = lora_tensors(transformer, "transformer", 5)
    write_lora(  # right key names, wrong shapes: a LoRA for a bigger Flux
        root / "character-wide.safetensors",
        {
            k: torch.cat([v, v], dim=1 if k.endswith("lora_A.weight") else 0)
            for k, v in wide.items()
        },
    )
    (tmp_path_factory.getbasetemp() / "outside.safetensors").write_bytes(
        (root / "character-a.safetensors").read_bytes()
    )
    for family in FAMILY_NAMES:
        for seed, suffix in ((11, "a"), (12, "b")):
            tensors = _family_lora(tiny_pipelines, family, seed)
            write_lora(root / f"character-{family}-{suffix}.safetensors", tensors)
    return root


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory):
    """The service's dataset root (PUT /datasets/{name} writes here)."""
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="session")
def train_storage(tmp_path_factory):
    """The service's training run folders."""
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="session")
def service(ray_cluster, lora_root, dataset_root, train_storage, tmp_path_factory):
    """The app from cluster/local.yaml, built by the product's own builder, on a test root."""
    import httpx
    import yaml
    from ray import serve

    from serve.app import build_app

    serve_config = yaml.safe_load((REPO_ROOT / "cluster" / "local.yaml").read_text())
    args = serve_config["applications"][0]["args"]
    args["lora_root"] = str(lora_root)
    args["dataset_root"] = str(dataset_root)
    args["train_storage_path"] = str(train_storage)
    args["max_body_bytes"] = MAX_BODY_BYTES
    args["remote_loras"] = {  # LoRAs by URL from the tests' own file server only
        "enabled": True,
        "allowed_hosts": ["127.0.0.1"],
        "allowed_schemes": ["http"],
        # The file server is on loopback at a port of its own: allowed explicitly.
        "allowed_networks": ["127.0.0.1/32"],
        "allowed_ports": "any",
        "cache_dir": str(tmp_path_factory.mktemp("lora-cache")),
    }
    # The test root is a local folder, which `auto` reads directly; `always` puts every
    # serving test through the node cache that object-store roots get in production.
    args["lora_root_cache"] = {
        "mode": "always",
        "cache_dir": str(tmp_path_factory.mktemp("lora-root-cache")),
    }
    for model in args["models"]:
        model["max_adapters_per_replica"] = MAX_ADAPTERS
    serve.run(build_app(args), name="loraplex", route_prefix="/")
    with httpx.Client(base_url=ray_cluster, timeout=300) as client:
        yield client
