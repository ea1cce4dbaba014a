"""`DELETE /datasets/{name}` on the shared service: it removes what PUT stored, answers 404 for
what is not there, checks names as PUT does, never follows a symlink out of the root, never takes
another dataset along, and refuses (409) while a training job that has not ended uses it."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.http_helpers import error_of


def _dataset(count: int = 2) -> dict:
    images = []
    for index in range(count):
        out = io.BytesIO()
        Image.new("RGB", (64, 64), (40 * index, 90, 200)).save(out, format="PNG")
        content = base64.b64encode(out.getvalue()).decode()
        images.append({"filename": f"img{index}.png", "content": content, "caption": "zxq"})
    return {"images": images}


def _put(service, name: str) -> None:
    response = service.put(f"/datasets/{name}", json=_dataset())
    assert response.status_code == 201, response.text


def test_delete_removes_the_dataset_and_then_answers_404(service, dataset_root):
    _put(service, "deleting/zxq")
    response = service.delete("/datasets/deleting/zxq")
    assert response.status_code == 200, response.text
    assert response.json() == {"deleted": "deleting/zxq"}
    assert not (dataset_root / "deleting" / "zxq").exists()
    assert error_of(service.get("/datasets/deleting/zxq"), 404, "not_found") == (
        "dataset not found: deleting/zxq"
    )
    assert error_of(service.delete("/datasets/deleting/zxq"), 404, "not_found") == (
        "dataset not found: deleting/zxq"
    )
    staging = dataset_root / ".staging"
    assert not staging.exists() or not any(staging.iterdir())  # nothing left aside


def test_delete_of_a_dataset_never_made_is_404(service):
    error_of(service.delete("/datasets/never-made"), 404, "not_found")


@pytest.mark.parametrize("name", [".hidden", "people/.git", "-dash", "x" * 300])
def test_names_are_checked_as_put_checks_them(service, dataset_root, name):
    hidden = dataset_root / ".hidden"
    if name == ".hidden":  # a hidden folder that exists is still not a dataset name
        hidden.mkdir(exist_ok=True)
    try:
        put = service.put(f"/datasets/{name}", json=_dataset(1))
        message = error_of(service.delete(f"/datasets/{name}"), 422, "invalid_request")
        assert put.status_code == 422 and message == put.json()["error"]["message"]
        assert message.startswith("name: ")
        if name == ".hidden":
            assert hidden.exists()
    finally:  # the session's dataset root is shared: other modules check it has no .hidden
        if name == ".hidden":
            hidden.rmdir()


def test_a_symlink_out_of_the_root_is_not_a_dataset(service, dataset_root, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.png").write_bytes(b"not yours")
    (dataset_root / "link-out").symlink_to(outside, target_is_directory=True)
    error_of(service.delete("/datasets/link-out"), 404, "not_found")
    assert (outside / "keep.png").read_bytes() == b"not yours"


def test_a_dataset_holding_others_is_kept_until_they_are_deleted(service, dataset_root):
    _put(service, "team")
    _put(service, "team/a")
    message = error_of(service.delete("/datasets/team"), 409, "conflict")
    assert message == "dataset team holds other datasets (a); delete those first"
    assert len(service.get("/datasets/team/a").json()["images"]) == 2
    assert len(service.get("/datasets/team").json()["images"]) == 2
    assert service.delete("/datasets/team/a").status_code == 200
    assert service.delete("/datasets/team").status_code == 200
    assert not (dataset_root / "team").exists()


@pytest.mark.slow  # submits a real training job (a Ray job with its own workers)
def test_a_dataset_in_use_by_a_job_is_kept_until_the_job_ends(service, dataset_root):
    _put(service, "in-use")
    body = {
        "base_model": "flux",
        "dataset": "in-use",
        "trigger_word": "zxq",
        "character_id": "in-use",
        "config": {"rank": 4, "resolution": 64, "max_train_steps": 100_000, "num_workers": 1},
    }
    submitted = service.post("/train", json=body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    try:
        message = error_of(service.delete("/datasets/in-use"), 409, "conflict")
        assert message == (
            f"dataset in-use is used by training job {job_id}, which has not ended; stop it "
            f"(DELETE /train/{job_id}) or wait for it to end"
        )
        assert (dataset_root / "in-use" / "img0.png").exists()
    finally:
        stopped = service.delete(f"/train/{job_id}")
    assert stopped.status_code == 200 and stopped.json()["state"] == "STOPPED", stopped.text
    assert service.delete("/datasets/in-use").status_code == 200
