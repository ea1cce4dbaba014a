"""A `POST /train` body -> the TrainJob to submit, checked before it becomes a Ray job.

The server fills in the paths the job reads and writes, and the rules its image URLs obey (those
of `remote_loras`): never a client's to choose. It pins the base model to the served one; the
job's own checks (cluster/train/checks.py) then run here, so a job that would fail once its
workers start is refused with 422 naming the field instead (409 when its output name is taken).
"""

from __future__ import annotations

from cluster.train.capacity import infeasible_reason
from cluster.train.checks import check_job
from cluster.train.config import TrainJob
from deployments.errors import Conflict, InvalidRequest, LoraplexError
from deployments.loras.remote import check_url
from serve.config import AppConfig
from serve.datasets import check_dataset_name
from serve.validation import validated

# The run folder, the paths the job reads and where its image URLs may point are the server's
# to choose, never a client's.
SERVER_FIELDS = ("lora_root", "dataset_root", "storage_path", "run_name", "url_rules")


def train_job(body: object, job_id: str, config: AppConfig) -> TrainJob:
    """The job `body` asks for, run as `job_id`; refusals are InvalidRequest naming the field.
    It reads the dataset (every image decoded), so the ingress calls it off its event loop."""
    job = validated(TrainJob, job_fields(body, job_id, config))
    check_capacity(job, config)
    check_servable(job, config)
    return job


def check_capacity(job: TrainJob, config: AppConfig) -> None:
    """Refuse a job no set of the cluster's nodes (or of the node types an autoscaler can add)
    could ever hold; one that fits but waits for resources in use is accepted (PENDING)."""
    import ray

    if not ray.is_initialized():  # no cluster to check against: the job's own wait decides
        return
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    reason = infeasible_reason(job.config, nodes, config.training_node_types.values())
    if reason is not None:
        raise InvalidRequest(reason)


def job_fields(body: object, job_id: str, config: AppConfig) -> dict:
    """A TrainJob's fields from a client's body, with the server's paths filled in and
    the base model's URI the served one; refusals name the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("body: expected a JSON object")
    for field in SERVER_FIELDS:
        if field in body:
            raise InvalidRequest(f"{field}: chosen by the server; leave it out")
    family = body.get("base_model")
    served = [m.model_uri for m in config.models if m.family == family]
    model_uri = body.get("model_uri") or (served[0] if served else "")
    if family is not None and isinstance(family, str) and served and model_uri not in served:
        raise InvalidRequest(
            f"model_uri: {model_uri!r} is not served here; train on a served base model "
            f"({', '.join(served)}) or leave it out"
        )
    if isinstance(body.get("dataset"), str):
        check_dataset_name(body["dataset"], "dataset")
    for index, item in enumerate(body.get("image_urls") or []):
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            check_url(item["url"], config.remote_loras, f"image_urls.{index}.url")
    return {
        **body,
        "model_uri": model_uri,
        "run_name": job_id,
        "lora_root": config.lora_root,
        "dataset_root": config.dataset_root,
        "storage_path": config.train_storage_path,
        "url_rules": config.remote_loras.url_rules.model_dump(mode="json"),
    }


def check_servable(job: TrainJob, config: AppConfig) -> None:
    """Refuse what would fail once workers start: a family not served here, and what the
    job's own checks find (a family it cannot train, an empty dataset, an unreadable
    image, ...), so a refused job never becomes a Ray job."""
    if not any(m.family == job.base_model for m in config.models):
        raise InvalidRequest(f"base_model: no {job.base_model} model is served here")
    try:
        check_job(job)
    except Conflict:
        raise  # the output's name is taken: 409, not a bad field
    except LoraplexError as e:
        raise InvalidRequest(_with_field(e.message)) from e
    except (ValueError, OSError) as e:
        raise InvalidRequest(_with_field(str(e))) from e


def _with_field(message: str) -> str:
    """Dataset problems are the `dataset` field's unless the message names one already."""
    head = message.split(":", 1)[0]
    return message if head and " " not in head else f"dataset: {message}"
