"""The cluster configs parse, pass the validators of the tools that read them, and agree.

- Serve configs (production.yaml, local.yaml, the RayService's serveConfigV2): Ray's
  ServeDeploySchema, then loraplex's AppConfig for the app's args.
- cluster/ray-cluster.yaml: Ray's cluster-config JSON schema (ray-schema.json) and the checks
  `ray up` runs on it after filling in the provider's defaults.
- cluster/kuberay/: core objects and every Ray pod template against Kubernetes' own schemas
  (kubernetes-validate); the RayService and RayJob, which are KubeRay CRDs, against the KubeRay
  v1 fields they may use, and their cluster specs through the parser that Ray's autoscaler
  runs on a KubeRay cluster.
- Across files: GPU shares fit the serving nodes, at the deployments' minimum and maximum
  replicas; the A100 resource a training job asks for is declared where it trains and nowhere
  it serves; the example training job publishes where production serves from.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from cluster import serve_config
from cluster.train.config import TrainJob
from serve.config import AppConfig

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_VERSION = importlib.metadata.version("ray")
A100 = "accelerator_type:A100"
EPSILON = 1e-6
# Kubernetes releases to validate against: an old one still in support, and the newest known.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]

# KubeRay v1 fields (ray-operator/apis/ray/v1): a misspelt key would be dropped by the
# API server's pruning, or refused by kubectl's strict field validation.
RAYSERVICE_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService",
    "excludeHeadPodFromServeSvc", "managedBy", "rayClusterDeletionDelaySeconds",
    "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
}  # fmt: skip
RAYJOB_FIELDS = {
    "entrypoint", "rayClusterSpec", "clusterSelector", "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit", "submissionMode",
    "submitterPodTemplate", "submitterConfig", "runtimeEnvYAML", "jobId", "metadata",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "suspend", "managedBy",
    "deletionPolicy",
}  # fmt: skip
CLUSTER_FIELDS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
    "workerGroupSpecs", "headServiceAnnotations", "gcsFaultToleranceOptions", "suspend",
    "managedBy",
}  # fmt: skip
HEAD_FIELDS = {"template", "rayStartParams", "headService", "enableIngress", "serviceType"}
WORKER_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts", "suspend",
}  # fmt: skip
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def documents(path: Path) -> dict[str, dict]:
    """A multi-document manifest's objects, by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text())}


def rayservice() -> dict:
    return load(KUBERAY / "rayservice.yaml")


def rayjob_files() -> dict[str, dict]:
    return documents(KUBERAY / "rayjob.yaml")


def serve_configs() -> dict[str, dict]:
    return {
        "production.yaml": load(CLUSTER / "production.yaml"),
        "local.yaml": load(CLUSTER / "local.yaml"),
        "rayservice serveConfigV2": yaml.safe_load(rayservice()["spec"]["serveConfigV2"]),
    }


def ray_clusters() -> dict[str, dict]:
    """Every KubeRay cluster spec in the manifests, by where it is."""
    return {
        "rayservice": rayservice()["spec"]["rayClusterConfig"],
        "rayjob": rayjob_files()["RayJob"]["spec"]["rayClusterSpec"],
    }


def node_types(cluster_spec: dict) -> dict[str, dict]:
    """The cluster as Ray's autoscaler reads a KubeRay cluster: node types with the Ray
    resources each pod advertises (from its limits and rayStartParams), schema-checked."""
    cr = {"metadata": {"name": "loraplex", "namespace": "default"}, "spec": cluster_spec}
    return _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))["available_node_types"]


def launcher_config() -> dict:
    """cluster/ray-cluster.yaml as `ray up` sees it, with the provider's defaults filled in."""
    return prepare_config(load(CLUSTER / "ray-cluster.yaml"))


def production_app() -> dict:
    [app] = load(CLUSTER / "production.yaml")["applications"]
    return app


def example_train_job() -> TrainJob:
    return TrainJob.model_validate(yaml.safe_load(rayjob_files()["ConfigMap"]["data"]["job.yaml"]))


# --- Serve configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["production.yaml", "local.yaml", "rayservice serveConfigV2"])
def test_serve_config_passes_rays_schema_and_loraplex_config(name):
    schema = ServeDeploySchema.model_validate(serve_configs()[name])
    [app] = schema.applications
    config = AppConfig.model_validate(app.args)
    # Every model has its deployment entry, and nothing else but the ingress does.
    assert {d.name for d in app.deployments} == {m.name for m in config.models} | {"Ingress"}


def test_rayservice_serves_production_yaml_as_written():
    assert rayservice()["spec"]["serveConfigV2"] == (CLUSTER / "production.yaml").read_text()
    # And the committed manifest is what `make kuberay` writes now.
    assert serve_config.generated() == (KUBERAY / "rayservice.yaml").read_text()


def test_generator_replaces_only_the_block():
    manifest = "spec:\n  a: 1\n  serveConfigV2: |\n    old: 1\n\n    x: 2\n\n  b: 2\nc: 3\n"
    written = serve_config.with_serve_config(manifest, "# note\nnew: 1\n\nlast: 2\n")
    assert written == (
        "spec:\n  a: 1\n  serveConfigV2: |\n    # note\n    new: 1\n\n    last: 2\n\n  b: 2\nc: 3\n"
    )
    with pytest.raises(serve_config.ManifestError):
        serve_config.with_serve_config(manifest + manifest, "new: 1\n")


# --- Ray's cluster launcher -------------------------------------------------------------------


def test_ray_cluster_yaml_passes_rays_cluster_schema():
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    raw = load(CLUSTER / "ray-cluster.yaml")
    jsonschema.validate(raw, json.loads(schema_path.read_text()))
    config = launcher_config()
    validate_config(config)  # the schema again, plus head type and max_workers rules
    # The launcher's default setup would install a nightly Ray over the image's.
    assert config["setup_commands"] == []
    types = config["available_node_types"]
    assert config["max_workers"] >= sum(t["max_workers"] for t in types.values())
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0


def test_every_image_runs_the_ray_loraplex_is_tested_with():
    release = re.escape(RAY_VERSION)
    docker = load(CLUSTER / "ray-cluster.yaml")["docker"]
    for image in (docker["image"], docker["head_image"]):
        assert re.fullmatch(rf"rayproject/ray:{release}-py\d+(-gpu)?", image), image
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{release}-py\d+-gpu$", dockerfile, re.M)
    for where, cluster in ray_clusters().items():
        assert cluster["rayVersion"] == RAY_VERSION, where


# --- KubeRay manifests ------------------------------------------------------------------------


def pod_templates() -> list[tuple[str, dict]]:
    found = []
    for where, cluster in ray_clusters().items():
        found.append((f"{where} head", cluster["headGroupSpec"]["template"]))
        for group in cluster["workerGroupSpecs"]:
            found.append((f"{where} {group['groupName']}", group["template"]))
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pod_templates_and_core_objects_pass_kubernetes_schemas(version):
    for where, template in pod_templates():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        try:
            kubernetes_validate.validate({**pod_template, "template": template}, version, True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {e.message} at {'.'.join(map(str, e.path))}")
    core = [rayjob_files()["ConfigMap"], load(KUBERAY / "serviceaccount.yaml")]
    for obj in core:
        kubernetes_validate.validate(obj, version, strict=True)


def check_cluster_spec(where: str, cluster: dict) -> None:
    assert set(cluster) <= CLUSTER_FIELDS, where
    assert set(cluster["headGroupSpec"]) <= HEAD_FIELDS, where
    groups = cluster["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups), where
    for spec in [cluster["headGroupSpec"], *groups]:
        # rayStartParams is map[string]string: a YAML number here is refused by the CRD.
        params = spec["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), (where, params)
        containers = spec["template"]["spec"]["containers"]
        assert containers[0]["image"] == "registry.example.com/loraplex:0.1.0", where
    for group in groups:
        assert set(group) <= WORKER_FIELDS, (where, group["groupName"])
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where


def test_rayservice_uses_kuberay_v1_fields():
    service = rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert set(service["spec"]) <= RAYSERVICE_FIELDS
    assert service["spec"]["upgradeStrategy"]["type"] in UPGRADE_TYPES
    check_cluster_spec("rayservice", service["spec"]["rayClusterConfig"])


def test_rayjob_uses_kuberay_v1_fields_and_runs_its_job_file():
    files = rayjob_files()
    job = files["RayJob"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job["spec"]) <= RAYJOB_FIELDS
    check_cluster_spec("rayjob", job["spec"]["rayClusterSpec"])
    # The entrypoint runs on the head: the ConfigMap must be mounted there at --config's path.
    config_path = re.fullmatch(
        r"python -m cluster\.train --config (\S+)", job["spec"]["entrypoint"]
    ).group(1)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    [volume] = [v for v in head["volumes"] if v.get("configMap")]
    assert volume["configMap"]["name"] == files["ConfigMap"]["metadata"]["name"]
    [mount] = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    folder, key = posixpath.split(config_path)
    assert folder == mount["mountPath"] and key in files["ConfigMap"]["data"]


def test_ray_reads_each_kuberay_cluster_as_intended():
    for where, cluster in ray_clusters().items():
        types = node_types(cluster)
        assert types["headgroup"]["resources"]["GPU"] == 0, where
        for group in cluster["workerGroupSpecs"]:
            assert types[group["groupName"]]["resources"]["GPU"] >= 1, (where, group)


# --- Across files -----------------------------------------------------------------------------


def model_replicas(bound: str) -> list[tuple[float, float]]:
    """(GPU share, CPUs) of every model replica production.yaml runs at `min` or `max`."""
    replicas = []
    for deployment in production_app()["deployments"]:
        options = deployment.get("ray_actor_options", {})
        if not options.get("num_gpus"):
            continue
        autoscaling = deployment.get("autoscaling_config")
        count = autoscaling[f"{bound}_replicas"] if autoscaling else deployment["num_replicas"]
        replicas += [(float(options["num_gpus"]), float(options.get("num_cpus", 1)))] * count
    return replicas


@dataclass
class Node:
    free_gpus: list[float]  # the unused fraction of each GPU
    free_cpus: float

    def take(self, share: float, cpus: float) -> bool:
        """Place a replica here if it fits. As in Ray, a share under one GPU must fit on a
        single GPU, and a larger one takes whole GPUs."""
        if cpus > self.free_cpus + EPSILON:
            return False
        if share < 1:
            gpus = [i for i, free in enumerate(self.free_gpus) if free + EPSILON >= share][:1]
        else:
            gpus = [i for i, free in enumerate(self.free_gpus) if free >= 1 - EPSILON]
            gpus = gpus[: int(share)] if len(gpus) >= share else []
        if not gpus:
            return False
        for i in gpus:
            self.free_gpus[i] -= min(share, 1.0)
        self.free_cpus -= cpus
        return True


def nodes_needed(replicas: list[tuple[float, float]], gpus: int, cpus: float) -> int:
    """Nodes of `gpus` GPUs and `cpus` CPUs that hold these replicas, placed first-fit,
    largest first."""
    nodes: list[Node] = []
    for share, cpu in sorted(replicas, reverse=True):
        assert share < 1 or share.is_integer(), f"num_gpus {share}: Ray takes <1 or whole GPUs"
        if not any(node.take(share, cpu) for node in nodes):
            nodes.append(Node([1.0] * gpus, cpus))
            assert nodes[-1].take(share, cpu), f"a replica ({share} GPU, {cpu} CPU) fits no node"
    return len(nodes)


def serving_types() -> dict[str, dict]:
    """The node types that serve: (where, node type as the autoscaler reads it)."""
    return {
        "ray-cluster.yaml serve_gpu": launcher_config()["available_node_types"]["serve_gpu"],
        "rayservice serve-gpu": node_types(ray_clusters()["rayservice"])["serve-gpu"],
    }


@pytest.mark.parametrize("where", ["ray-cluster.yaml serve_gpu", "rayservice serve-gpu"])
def test_serving_nodes_hold_production_replicas_at_both_bounds(where):
    node = serving_types()[where]
    gpus, cpus = node["resources"]["GPU"], node["resources"]["CPU"]
    at_min = nodes_needed(model_replicas("min"), gpus, cpus)
    at_max = nodes_needed(model_replicas("max"), gpus, cpus)
    assert at_min <= node["min_workers"], f"{at_min} nodes for the minimum replicas"
    assert at_max <= node["max_workers"], f"{at_max} nodes for the maximum replicas"
    # Serving nodes never offer the training resource, so Ray Train never lands on them.
    assert A100 not in node["resources"]


def test_ingress_fits_on_the_head():
    [ingress] = [d for d in production_app()["deployments"] if d["name"] == "Ingress"]
    needed = ingress["num_replicas"] * ingress["ray_actor_options"]["num_cpus"]
    launcher = launcher_config()
    heads = {
        "ray-cluster.yaml": launcher["available_node_types"][launcher["head_node_type"]],
        "rayservice": node_types(ray_clusters()["rayservice"])["headgroup"],
    }
    for where, head in heads.items():
        assert head["resources"]["CPU"] >= needed, where


def test_training_groups_declare_the_accelerator_the_job_asks_for():
    job = example_train_job()
    assert job.config.use_gpu and job.config.accelerator_type == "A100"
    training_types = {
        "ray-cluster.yaml train_a100": launcher_config()["available_node_types"]["train_a100"],
        "rayservice train-a100": node_types(ray_clusters()["rayservice"])["train-a100"],
        "rayjob train-a100": node_types(ray_clusters()["rayjob"])["train-a100"],
    }
    for where, node in training_types.items():
        assert node["resources"].get(A100, 0) >= 1, where
        gpus = node["resources"]["GPU"] * node["max_workers"]
        assert gpus >= job.config.num_workers, f"{where}: {gpus} GPUs at most"
    rayjob = training_types["rayjob train-a100"]
    # The RayJob's cluster is fixed-size: all the job's workers fit from the start.
    assert rayjob["resources"]["GPU"] * rayjob["min_workers"] >= job.config.num_workers


def test_example_training_job_publishes_where_production_serves():
    job = example_train_job()
    args = production_app()["args"]
    assert job.lora_root == args["lora_root"]
    assert job.dataset_root == args["dataset_root"]
    assert job.storage_path == args["train_storage_path"]
    [model] = [m for m in args["models"] if m["family"] == job.base_model]
    assert job.model_uri == model["model_uri"]


def test_production_waits_for_the_training_nodes_an_autoscaler_adds():
    """Training nodes scale from zero, so `POST /train` must know their type (else a job for
    the A100s is refused while none is up); the type declared is one every config offers."""
    from cluster.train.capacity import infeasible_reason

    declared = production_app()["args"]["training_node_types"]
    offered = [
        launcher_config()["available_node_types"]["train_a100"]["resources"],
        node_types(ray_clusters()["rayservice"])["train-a100"]["resources"],
    ]
    for resources in declared.values():
        assert any(all(node.get(k, 0) >= v for k, v in resources.items()) for node in offered)
    job = example_train_job()
    head_only = [{"CPU": 16.0}]
    assert infeasible_reason(job.config, head_only) is not None
    assert infeasible_reason(job.config, head_only, declared.values()) is None
