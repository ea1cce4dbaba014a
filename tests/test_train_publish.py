"""A training job's output: names checked when the job is submitted, an existing adapter replaced
only with `config.overwrite`, and a name taken while the job trained failing it, not replaced.

The publish step runs on real files (cluster/train/run.py's `finish`, the LoRA store); the HTTP
refusals go through the session's app and are refused before any Ray job is submitted."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.train.checks import check_job
from cluster.train.config import RunStatus, TrainJob
from cluster.train.progress import read_status
from cluster.train.publish import kohya_name
from cluster.train.run import finish
from deployments.errors import Conflict
from tests.train_jobs import tiny_job, write_dataset


@pytest.mark.parametrize(
    ("output_name", "reason"),
    [
        ("../../..", "names may not contain '..' or empty parts"),
        ("styles/../../x", "names may not contain '..' or empty parts"),
        ("/etc/cron.d/x", "names are relative to the LoRA root"),
        (".loraplex/catalog", "hidden files and folders are not served"),
        ("a\\b", "not a file name"),
    ],
)
def test_an_output_name_outside_the_lora_root_is_refused_with_the_job(output_name, reason):
    with pytest.raises(ValidationError) as raised:
        TrainJob(base_model="flux", dataset="d", output_name=output_name)
    [error] = raised.value.errors()
    assert error["loc"] == ("output_name",)
    assert f"is not a name under the LoRA root ({reason})" in error["msg"]


@pytest.fixture
def job(tmp_path) -> TrainJob:
    return tiny_job(tmp_path, "flux", write_dataset(tmp_path / "data", count=2))


def test_a_taken_name_is_refused_before_training_unless_overwrite(job, tmp_path):
    check_job(job)  # nothing published yet
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / job.output_file).write_bytes(b"someone else's adapter")
    with pytest.raises(Conflict) as raised:
        check_job(job)
    assert raised.value.message == (
        "character_id: character-flux-test.safetensors already exists in the LoRA root; set "
        "config.overwrite: true to replace it, or choose another name"
    )
    overwrite = job.model_copy(update={"config": job.config.model_copy(update={"overwrite": True})})
    check_job(overwrite)
    (tmp_path / "loras" / job.output_file).unlink()
    (tmp_path / "loras" / kohya_name(job.output_file)).write_bytes(b"a kohya copy")
    kohya = job.model_copy(update={"config": job.config.model_copy(update={"export_kohya": True})})
    with pytest.raises(Conflict, match="character-flux-test.kohya.safetensors already exists"):
        check_job(kohya)


def test_a_name_taken_while_training_fails_the_job_and_keeps_the_file(job, tmp_path):
    run_dir = str(tmp_path / "runs" / "run-1")
    published = finish(job, run_dir, RunStatus(state="RUNNING"), b"first", "ckpt/adapter")
    assert published.state == "SUCCEEDED" and published.output_lora == job.output_file
    target = tmp_path / "loras" / job.output_file
    assert target.read_bytes() == b"first"

    failed = finish(job, run_dir, RunStatus(state="RUNNING"), b"second", "ckpt/adapter")
    assert failed.state == "FAILED" and failed.output_lora is None
    assert failed.error == (
        "character_id: character-flux-test.safetensors already exists in the LoRA root; set "
        "config.overwrite: true to replace it, or choose another name. Not published; the "
        "trained adapter is kept at ckpt/adapter"
    )
    assert read_status(run_dir).model_dump() == failed.model_dump()  # what GET /train shows
    assert target.read_bytes() == b"first"

    overwrite = job.model_copy(update={"config": job.config.model_copy(update={"overwrite": True})})
    replaced = finish(overwrite, run_dir, RunStatus(state="RUNNING"), b"third", "ckpt/adapter")
    assert replaced.state == "SUCCEEDED" and target.read_bytes() == b"third"


# Over HTTP: refused before a Ray job exists.


def _job_count() -> int:
    import ray
    from ray.job_submission import JobSubmissionClient

    return len(JobSubmissionClient(ray.get_runtime_context().gcs_address).list_jobs())


def _body(**fields) -> dict:
    body = {"base_model": "flux", "dataset": "not-read", "trigger_word": "zxq"}
    return {**body, **fields, "config": {"max_train_steps": 2, **fields.get("config", {})}}


def test_post_train_refuses_names_and_server_fields_before_submitting(service):
    before = _job_count()
    escape = service.post("/train", json=_body(output_name="../../.."))
    assert escape.status_code == 422, escape.text
    assert escape.json()["error"]["message"].startswith("output_name: "), escape.text
    taken = service.post("/train", json=_body(character_id="a"))  # the session's character-a
    assert taken.status_code == 409, taken.text
    assert taken.json()["error"] == {
        "code": "conflict",
        "message": "character_id: character-a.safetensors already exists in the LoRA root; set "
        "config.overwrite: true to replace it, or choose another name",
    }
    rules = {"allow_private_addresses": True, "allowed_ports": "any"}
    chosen = service.post("/train", json=_body(output_name="x", url_rules=rules))
    assert chosen.status_code == 422, chosen.text
    assert chosen.json()["error"]["message"] == "url_rules: chosen by the server; leave it out"
    assert _job_count() == before
