"""Training over HTTP: datasets, `POST /train` as a real Ray job, status, logs, stop.

Real Ray (with its dashboard, which hosts the job server), real Serve, the real training job on
tiny models; nothing mocked.
"""

from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image

# Trains, or starts services of its own: left out of `make test-fast`.
pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 300
IMAGE_PX = 64


def _png(seed: int, size: int = IMAGE_PX, fmt: str = "PNG") -> bytes:
    """A small image with some structure (a colour field and a square), different per seed."""
    image = Image.new("RGB", (size, size), ((seed * 67) % 256, (seed * 131) % 256, 90))
    for x in range(size // 4, size // 2):
        for y in range(size // 4, size // 2 + seed % 8):
            image.putpixel((x, y), (250, 250 - seed * 20 % 250, 10))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _json_dataset(count: int) -> dict:
    return {
        "images": [
            {
                "filename": f"img{i}.png",
                "content": base64.b64encode(_png(i)).decode(),
                "caption": f"a photo of zxq person, pose {i}",
            }
            for i in range(count)
        ]
    }


def _job_client():
    import ray
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray.get_runtime_context().gcs_address)


def _wait_for(service, job_id: str, states: tuple[str, ...], timeout_s: float = JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        response = service.get(f"/train/{job_id}")
        assert response.status_code == 200, response.text
        status = response.json()
        if status["state"] in states:
            return status
        ended = status["state"] in ("FAILED", "STOPPED", "SUCCEEDED")
        if ended or time.monotonic() > deadline:
            logs = service.get(f"/train/{job_id}/logs", params={"lines": 60}).text
            pytest.fail(f"{job_id} is {status['state']}: {status}\n{logs}")
        time.sleep(0.5)


# Datasets


def test_dataset_upload_json(service, dataset_root):
    body = _json_dataset(3)
    jpeg = base64.b64encode(_png(7, fmt="JPEG")).decode()
    body["images"].append({"filename": "photo.jpg", "content": jpeg, "caption": "zxq smiling"})
    response = service.put("/datasets/people/zxq", json=body)
    assert response.status_code == 201, response.text
    listed = response.json()["images"]
    assert [i["filename"] for i in listed] == ["img0.png", "img1.png", "img2.png", "photo.png"]
    folder = dataset_root / "people" / "zxq"
    assert (folder / "photo.txt").read_text() == "zxq smiling"
    with Image.open(folder / "photo.png") as image:  # stored as PNG, whatever it came as
        assert image.format == "PNG" and image.size == (IMAGE_PX, IMAGE_PX)
    assert service.get("/datasets/people/zxq").json()["images"] == listed

    # A PUT replaces the dataset whole.
    response = service.put("/datasets/people/zxq", json=_json_dataset(1))
    assert response.status_code == 201, response.text
    assert sorted(p.name for p in folder.iterdir()) == ["img0.png", "img0.txt"]


def test_dataset_upload_multipart(service, dataset_root):
    files = [
        ("files", ("a.png", _png(1), "image/png")),
        ("files", ("b.jpg", _png(2, fmt="JPEG"), "image/jpeg")),
        ("files", ("a.txt", b"zxq in a hat\n", "text/plain")),
    ]
    response = service.put("/datasets/multi", files=files, data={"b.txt": "zxq at the beach"})
    assert response.status_code == 201, response.text
    captions = {i["filename"]: i["caption"] for i in response.json()["images"]}
    assert captions == {"a.png": "zxq in a hat", "b.png": "zxq at the beach"}
    assert (dataset_root / "multi" / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("bad-image", {"images": [{"filename": "x.png", "content": "aGVsbG8="}]}, "x.png"),
        ("bad-b64", {"images": [{"filename": "x.png", "content": "%%%"}]}, "images.0.content"),
        ("bad-file", {"images": [{"filename": "../x.png", "content": "aGVsbG8="}]}, "../x.png"),
        ("no-images", {"images": []}, "images"),
        (".hidden", _json_dataset(1), "name"),
    ],
)
def test_dataset_refused(service, dataset_root, name, body, field):
    response = service.put(f"/datasets/{name}", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["message"]
    assert not (dataset_root / name).exists()


def test_dataset_over_body_limit(service):
    from tests.conftest import MAX_BODY_BYTES

    big = {"images": [{"filename": "x.png", "content": "A" * MAX_BODY_BYTES}]}
    assert service.put("/datasets/huge", json=big).status_code == 413


# Refusals before any worker starts


@pytest.fixture(scope="module")
def zxq_dataset(service):
    assert service.put("/datasets/zxq4", json=_json_dataset(4)).status_code == 201
    return "zxq4"


def _train_body(dataset: str, character_id: str, **config) -> dict:
    return {
        "base_model": "flux",
        "dataset": dataset,
        "trigger_word": "zxq",
        "character_id": character_id,
        "config": {
            "rank": 4,
            "alpha": 4,
            "resolution": IMAGE_PX,
            "max_train_steps": 4,
            "num_workers": 2,
            "learning_rate": 1e-2,
            "save_every": 2,
            **config,
        },
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"config": {"rank": 0}}, "config.rank"),
        ({"config": {"learning_rate": -1e-4}}, "config.learning_rate"),
        ({"base_model": "dalle"}, "base_model"),
        ({"lora_root": "/etc"}, "lora_root"),
        ({"storage_path": "/tmp"}, "storage_path"),
        ({"dataset": "../outside"}, "dataset"),
        ({"model_uri": "/somewhere/else"}, "model_uri"),
        ({"config": {"no_such_knob": 1}}, "config.no_such_knob"),
        ({"character_id": None}, "character_id or output_name"),
        ({"dataset": None, "image_urls": [{"url": "http://evil.test/a.png"}]}, "image_urls.0.url"),
    ],
)
def test_bad_config_refused(service, zxq_dataset, change, field):
    body = _train_body(zxq_dataset, "refused")
    body.update(change)
    before = len(_job_client().list_jobs())
    response = service.post("/train", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert field in response.json()["error"]["message"]
    assert len(_job_client().list_jobs()) == before  # nothing submitted


def test_untrainable_family_refused(service, zxq_dataset):
    from deployments.family import FAMILY_NAMES, get_family

    untrainable = [name for name in FAMILY_NAMES if get_family(name).training is None]
    if not untrainable:
        pytest.skip("every family trains")
    body = {**_train_body(zxq_dataset, "refused"), "base_model": untrainable[0]}
    response = service.post("/train", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("base_model: ")


@pytest.mark.parametrize("problem", ["empty", "unreadable"])
def test_bad_dataset_refused(service, dataset_root, problem):
    folder = dataset_root / f"broken-{problem}"
    folder.mkdir()
    if problem == "unreadable":  # written behind the API's back: PUT would have refused it
        (folder / "good.png").write_bytes(_png(1))
        (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    before = len(_job_client().list_jobs())
    response = service.post("/train", json=_train_body(folder.name, "refused"))
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("dataset") or "bad.png" in message, message
    if problem == "unreadable":
        assert "bad.png" in message
    assert len(_job_client().list_jobs()) == before


def test_unknown_job_is_404(service):
    for path in ("/train/train-" + "0" * 32, "/train/nope", "/train/nope/logs"):
        assert service.get(path).status_code == 404, path
    assert service.delete("/train/train-" + "0" * 32).status_code == 404


# Real runs


@pytest.mark.parametrize(
    ("family", "endpoint"), [("flux", "flux"), ("z_image", "z-image")], ids=["flux", "z_image"]
)
def test_job_runs_and_serves(service, zxq_dataset, train_storage, family, endpoint):
    """POST /train to SUCCEEDED with 2 workers; the adapter serves at once and changes the image."""
    character_id = f"zxq-{family}"
    started = time.monotonic()
    body = {**_train_body(zxq_dataset, character_id), "base_model": family}
    response = service.post("/train", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.json()["status_url"] == f"/train/{job_id}"

    status = _wait_for(service, job_id, ("SUCCEEDED",))
    assert status["output_lora"] == f"character-{character_id}.safetensors"
    assert status["step"] == status["total_steps"] == 4
    assert status["loss"] is not None and status["workers"] == 2
    base = {"prompt": "zxq portrait", "width": 64, "height": 64, "steps": 2, "seed": 3}
    image = service.post(f"/{endpoint}-lora", json={**base, "lora_id": character_id})
    first_image_s = time.monotonic() - started
    assert image.status_code == 200, image.text
    print(f"\n{family}: POST /train -> first image with the new adapter: {first_image_s:.1f} s")
    assert image.content != service.post(f"/{endpoint}", json=base).content

    listed = {e["name"]: e for e in service.get("/loras").json()["loras"]}
    entry = listed[f"character-{character_id}.safetensors"]
    assert entry["family"] == family and entry["rank"] == 4 and entry["error"] is None

    loss = service.get(f"/train/{job_id}/loss.png")
    assert loss.status_code == 200 and loss.headers["content-type"] == "image/png"
    logs = service.get(f"/train/{job_id}/logs", params={"lines": 5})
    assert logs.status_code == 200 and 0 < len(logs.text.splitlines()) <= 5
    for url in status["samples"]:
        assert service.get(url).status_code == 200
    assert (train_storage / job_id / "job.json").exists()

    # A Ray job like any other: `ray job list` shows it, and so does GET /train.
    jobs = {info.submission_id: info for info in _job_client().list_jobs()}
    assert jobs[job_id].metadata["loraplex.lora_name"] == entry["name"]
    assert job_id in [job["job_id"] for job in service.get("/train").json()["jobs"]]


def test_delete_stops_a_running_job(service, zxq_dataset, lora_root):
    body = _train_body(zxq_dataset, "zxq-stopped", max_train_steps=100_000, save_every=100_000)
    response = service.post("/train", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while service.get(f"/train/{job_id}").json()["step"] < 1:  # training, not just starting
        assert time.monotonic() < deadline
        time.sleep(0.5)

    stopped = service.delete(f"/train/{job_id}")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["state"] == "STOPPED"
    assert service.get(f"/train/{job_id}").json()["state"] == "STOPPED"
    time.sleep(2)  # nothing lands late either
    assert not (lora_root / "character-zxq-stopped.safetensors").exists()

    # Deleting an ended job forgets it.
    assert service.delete(f"/train/{job_id}").json()["deleted"] is True
    assert service.get(f"/train/{job_id}").status_code == 404


# The command line


def _loraplex(*args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_refuses_bad_config_before_submitting(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "base_model: flux\ndataset: ./nowhere\ncharacter_id: cli\n"
        "config: {rank: 0, learning_rate: -1}\n"
    )
    result = _loraplex("train", "--config", str(job), "--address", "http://127.0.0.1:9")
    assert result.returncode == 2, result.stderr
    assert "config.rank" in result.stderr and "config.learning_rate" in result.stderr


def test_cli_submits_and_waits(service, zxq_dataset, dataset_root, lora_root, train_storage):
    import ray
    import yaml

    job = train_storage / "cli-job.yaml"
    fields = _train_body(str(dataset_root / zxq_dataset), "zxq-cli")
    fields.update(lora_root=str(lora_root), storage_path=str(train_storage))
    job.write_text(yaml.safe_dump(fields))
    address = ray.get_runtime_context().gcs_address
    result = _loraplex("train", "--config", str(job), "--address", address, "--wait")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    job_id = result.stdout.splitlines()[0]
    assert result.stdout.rstrip().endswith(f"{job_id}: SUCCEEDED")
    assert (lora_root / "character-zxq-cli.safetensors").exists()
    # The run folder is <storage_path>/<job id>, so the server reports CLI jobs too.
    assert service.get(f"/train/{job_id}").json()["state"] == "SUCCEEDED"
