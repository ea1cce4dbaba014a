"""Training on its own node type beside serving, on a multi-node cluster (cluster_helpers.py):
a job for the A100 node runs its workers there and nowhere else while the serving node keeps
answering, its adapter then serves; a job for an accelerator the cluster lacks is refused; and
losing the A100 node mid-run resumes the job from its last checkpoint once a new A100 node
joins, ending with the weights the uninterrupted run gave.
"""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.cluster_helpers import HEAD_RESOURCE, multinode_cluster, wait_for
from tests.train_jobs import write_dataset

# Starts a cluster of its own and trains: left out of `make test-fast`.
pytestmark = pytest.mark.slow

SMALL = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2, "seed": 7}
STEPS = 24
SAVE_EVERY = 4
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The loraplex app (flux at half a GPU, the ingress on the head) on a cluster of a head,
    a serving node and an A100 node, with the roots a training job needs."""
    from loadtest import service

    root = tmp_path_factory.mktemp("multinode-training")
    write_dataset(root / "datasets" / "shapes", count=4)
    args = {
        "lora_root": str(root / "loras"),
        "dataset_root": str(root / "datasets"),
        "train_storage_path": str(root / "train"),
        "models": [{"name": "flux", "family": "flux", "model_uri": "tiny://flux"}],
    }
    options = {
        "flux": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0.5}},
        "Ingress": {"ray_actor_options": {"num_cpus": 0.25, "resources": {HEAD_RESOURCE: 1}}},
    }
    with multinode_cluster() as cluster:
        service.deploy(args, options, "loraplex")
        with httpx.Client(base_url=cluster.url, timeout=120) as client:
            yield cluster, client, root


def _body(character_id: str, **config) -> dict:
    return {
        "base_model": "flux",
        "dataset": "shapes",
        "trigger_word": "ohwx",
        "character_id": character_id,
        "config": {
            "rank": 4,
            "resolution": 64,
            "learning_rate": 2e-2,
            "max_train_steps": STEPS,
            "save_every": SAVE_EVERY,
            "num_workers": 2,
            "accelerator_type": "A100",
            "max_failures": 2,
            "caption_dropout": 0.25,
            **config,
        },
    }


def _submit(client, body: dict) -> str:
    response = client.post("/train", json=body)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def _status(client, job_id: str) -> dict:
    response = client.get(f"/train/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def _ended(client, job_id: str) -> dict:
    status = wait_for(
        lambda: _status(client, job_id),
        lambda s: s["state"] in ("SUCCEEDED", "FAILED", "STOPPED"),
        timeout_s=JOB_TIMEOUT_S,
        every_s=0.5,
    )
    logs = client.get(f"/train/{job_id}/logs", params={"lines": 40}).text
    assert status["state"] == "SUCCEEDED", f"{status}\n{logs}"
    return status


def _worker_nodes(cluster) -> set[str]:
    """The nodes of the training workers alive now, from Ray's state API."""
    from ray.util.state import list_actors

    workers = list_actors(
        address=cluster.address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return {worker.node_id for worker in workers}


def test_a_job_for_an_accelerator_the_cluster_lacks_is_refused(app):
    _, client, _ = app
    response = client.post("/train", json=_body("never", accelerator_type="H100"))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"] == (
        "config.num_workers: 2 workers of {CPU: 1, accelerator_type:H100} cannot be placed: "
        "this cluster has no node with accelerator_type H100"
    )


def test_training_runs_on_the_a100_node_while_serving_goes_on(app):
    cluster, client, root = app
    base = client.post("/flux", json=SMALL)
    assert base.status_code == 200, base.text
    job_id = _submit(client, _body("straight"))
    wait_for(lambda: _status(client, job_id), lambda s: s["step"] >= 1, timeout_s=JOB_TIMEOUT_S)
    nodes = _worker_nodes(cluster)
    served = [client.post("/flux", json=SMALL) for _ in range(3)]  # while it trains
    _ended(client, job_id)

    a100 = cluster.node_id(cluster.a100)
    print(f"\ntraining workers on: {[cluster.role_of(node) for node in nodes]}")
    assert nodes == {a100}
    assert [r.status_code for r in served] == [200] * 3
    assert all(r.content == base.content for r in served)
    # What the job published serves at once, from the serving node.
    image = client.post("/flux-lora", json={**SMALL, "lora_id": "straight"})
    assert image.status_code == 200, image.text
    assert image.content != base.content
    assert (root / "loras" / "character-straight.safetensors").exists()


def test_losing_the_a100_node_resumes_from_the_last_checkpoint(app):
    cluster, client, root = app
    job_id = _submit(client, _body("resumed"))
    checkpoints = root / "train" / job_id / "checkpoints"
    wait_for(
        lambda: _status(client, job_id),
        lambda s: s["step"] > SAVE_EVERY + 1 and any(checkpoints.glob("checkpoint_*")),
        timeout_s=JOB_TIMEOUT_S,
        every_s=0.1,
    )
    lost_at = _status(client, job_id)["step"]
    assert lost_at < STEPS, "the run ended before its node could be lost"
    cluster.remove(cluster.a100)  # at once, as a machine is lost
    time.sleep(3)
    waiting = _status(client, job_id)
    assert waiting["state"] in ("RUNNING", "PENDING"), waiting
    cluster.add_a100_node()
    status = _ended(client, job_id)
    print(
        f"\nA100 node lost at step {lost_at}; the job ended {status['state']} at {status['step']}"
    )

    assert status["step"] == STEPS
    resumed = load_file(str(root / "loras" / "character-resumed.safetensors"))
    straight = load_file(str(root / "loras" / "character-straight.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-5)
    image = client.post("/flux-lora", json={**SMALL, "lora_id": "resumed"})
    assert image.status_code == 200, image.text
