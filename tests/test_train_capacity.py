"""Training that knows the cluster: a job no node set could hold is refused at once (422 naming
the numbers), one that fits but waits for resources in use shows PENDING with what it waits for
and the jobs ahead of it, and fails after `config.start_timeout_s`.

The pure checks run on node shapes like a real cluster's (a CPU-only head, a serving node of
GPUs, an A100 node as Ray Train's `accelerator_type` finds it); the HTTP ones on the session's
Ray cluster, whose free CPUs a placeholder actor takes so the wait is certain.
"""

from __future__ import annotations

import time

import pytest

from cluster.train.capacity import infeasible_reason, waiting_for, worker_resources
from cluster.train.config import TrainConfig
from tests.train_jobs import write_dataset

HEAD = {"CPU": 4.0, "memory": 8e9}
SERVING = {"CPU": 16.0, "GPU": 2.0}
A100 = {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A100": 1.0}
JOB_TIMEOUT_S = 300


def config(**fields) -> TrainConfig:
    return TrainConfig(**fields)


def test_a_worker_asks_what_ray_train_asks():
    assert worker_resources(config()) == {"CPU": 1.0}
    assert worker_resources(config(use_gpu=True)) == {"GPU": 1.0}
    assert worker_resources(config(use_gpu=True, accelerator_type="A100")) == {
        "GPU": 1.0,
        "accelerator_type:A100": 0.001,
    }
    assert worker_resources(config(cpus_per_worker=0.2)) == {"CPU": 0.2}


def test_a_worker_needs_a_cpu_or_a_gpu():
    with pytest.raises(ValueError, match="cpus_per_worker"):
        config(cpus_per_worker=0)


def test_a_job_the_nodes_hold_is_feasible_busy_or_not():
    nodes = [HEAD, SERVING, A100]
    assert infeasible_reason(config(num_workers=28), nodes) is None
    assert (
        infeasible_reason(config(num_workers=1, use_gpu=True, accelerator_type="A100"), nodes)
        is None
    )
    # 0.001 of the accelerator resource each: the A100 node's 8 CPUs bound it, not the label.
    assert infeasible_reason(config(num_workers=8, accelerator_type="A100"), nodes) is None


def test_a_job_for_an_accelerator_the_cluster_lacks_names_it():
    reason = infeasible_reason(config(num_workers=2, accelerator_type="A100"), [HEAD, SERVING])
    assert reason == (
        "config.num_workers: 2 workers of {CPU: 1, accelerator_type:A100} cannot be placed: "
        "this cluster has no node with accelerator_type A100"
    )


def test_a_job_too_big_for_every_node_gives_the_numbers():
    reason = infeasible_reason(config(cpus_per_worker=32), [HEAD, SERVING])
    assert reason is not None and "no node holds one worker" in reason and "CPU 16" in reason
    reason = infeasible_reason(config(num_workers=3, use_gpu=True), [HEAD, SERVING])
    assert reason is not None and "hold 2 such workers at most" in reason


def test_a_node_type_an_autoscaler_can_add_makes_the_job_wait_instead():
    job = config(num_workers=4, use_gpu=True, accelerator_type="A100")
    assert infeasible_reason(job, [HEAD, SERVING]) is not None
    assert infeasible_reason(job, [HEAD, SERVING], [A100]) is None


def test_what_a_job_waits_for():
    assert (
        waiting_for(config(num_workers=2), {"CPU": 0.4}) == "2 workers of {CPU: 1}: 2 CPU; 0.4 free"
    )
    gpu = config(num_workers=1, use_gpu=True, accelerator_type="A100")
    assert waiting_for(gpu, {"CPU": 3.0, "GPU": 1.0}) == (
        "1 workers of {GPU: 1, accelerator_type:A100}: a node with accelerator_type A100"
    )
    assert "free in total" in waiting_for(config(num_workers=2), {"CPU": 2.0})


# Over HTTP, on the session's cluster


def _body(dataset: str, character_id: str, **train) -> dict:
    return {
        "base_model": "flux",
        "dataset": dataset,
        "character_id": character_id,
        "config": {"rank": 4, "resolution": 64, "max_train_steps": 2, "save_every": 2, **train},
    }


@pytest.fixture(scope="module")
def dataset(dataset_root) -> str:
    write_dataset(dataset_root / "capacity", count=2)
    return "capacity"


@pytest.mark.slow
def test_a_job_no_node_could_hold_is_refused_naming_the_numbers(service, dataset):
    response = service.post(
        "/train", json=_body(dataset, "never", num_workers=2, accelerator_type="A100")
    )
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("config.num_workers: 2 workers of {CPU: 1, accelerator_type:A100}")
    assert message.endswith("this cluster has no node with accelerator_type A100")


@pytest.fixture
def cpus_taken(service):
    """Every CPU free now, held by a placeholder actor until the test lets go of it."""
    import ray

    @ray.remote
    class Placeholder:
        def ready(self) -> bool:
            return True

    free = ray.available_resources().get("CPU", 0.0)
    holder = Placeholder.options(num_cpus=free).remote()
    ray.get(holder.ready.remote(), timeout=60)
    assert ray.available_resources().get("CPU", 0.0) < 1, ray.available_resources()
    yield lambda: ray.kill(holder)
    ray.kill(holder)


def _status(service, job_id: str) -> dict:
    response = service.get(f"/train/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def _until(service, job_id: str, check, timeout_s: float = JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = _status(service, job_id)
        if check(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


@pytest.mark.slow
def test_a_job_waiting_for_resources_is_pending_then_runs_or_times_out(
    service, dataset, cpus_taken
):
    first = service.post("/train", json=_body(dataset, "waits", num_workers=2))
    assert first.status_code == 202, first.text
    first_id = first.json()["job_id"]
    pending = _until(service, first_id, lambda s: "workers" in (s["waiting_for"] or ""))
    assert pending["state"] == "PENDING"
    assert pending["waiting_for"].startswith("2 workers of {CPU: 1}: 2 CPU; ")
    assert pending["message"] == f"Waiting for {pending['waiting_for']}."
    assert pending["jobs_ahead"] == []

    second = service.post(
        "/train", json=_body(dataset, "gives-up", num_workers=1, start_timeout_s=4)
    )
    assert second.status_code == 202, second.text
    second_id = second.json()["job_id"]
    behind = _until(service, second_id, lambda s: "workers" in (s["waiting_for"] or ""))
    assert behind["jobs_ahead"] == [first_id]
    listed = {job["job_id"]: job["state"] for job in service.get("/train").json()["jobs"]}
    assert listed[first_id] == listed[second_id] == "PENDING"

    failed = _until(service, second_id, lambda s: s["state"] in ("FAILED", "SUCCEEDED"))
    assert failed["state"] == "FAILED"
    assert failed["error"].startswith(
        "config.start_timeout_s: the workers waited 4 s for 1 workers"
    )

    cpus_taken()  # the resources come free: the first job runs and publishes
    done = _until(service, first_id, lambda s: s["state"] in ("FAILED", "SUCCEEDED"))
    assert done["state"] == "SUCCEEDED", done
    assert done["waiting_for"] is None and done["jobs_ahead"] == []
