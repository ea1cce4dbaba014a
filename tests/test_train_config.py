"""Bad training jobs are refused before any worker starts, with the field named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cluster.train.checks import check_job
from cluster.train.config import TrainJob
from cluster.train.data import StepOrder, bucket_size, check_dataset, with_trigger
from cluster.train.progress import loss_curve_png, run_dir_for
from cluster.train.run import run
from deployments.errors import InvalidRequest
from tests.conftest import REPO_ROOT
from tests.train_jobs import tiny_job, write_dataset


def _job(tmp: Path, **changes) -> dict:
    data = json.loads(tiny_job(tmp, "flux", write_dataset(tmp / "data")).model_dump_json())
    for key, value in changes.items():
        if key in data["config"]:
            data["config"][key] = value
        else:
            data[key] = value
    return data


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rank": 0}, "config.rank"),
        ({"learning_rate": -1e-4}, "config.learning_rate"),
        ({"base_model": "dalle"}, "base_model"),
        ({"lr_scheduler": "exponential"}, "config.lr_scheduler"),
        ({"steps": 10}, "steps"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(tmp_path, changes, field):
    with pytest.raises(ValidationError) as error:
        TrainJob.model_validate(_job(tmp_path, **changes))
    locations = [".".join(str(p) for p in e["loc"]) for e in error.value.errors()]
    assert field in locations


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    job = TrainJob.model_validate(_job(tmp_path, dataset=str(tmp_path / "empty")))
    with pytest.raises(InvalidRequest, match=r"^dataset: no images found"):
        check_dataset(job)
    with pytest.raises(InvalidRequest, match=r"^dataset: no images found"):
        run(job)  # refused before Ray is asked for anything
    assert not Path(run_dir_for(job)).exists()


def test_missing_dataset_folder_is_refused(tmp_path):
    job = TrainJob.model_validate(_job(tmp_path, dataset=str(tmp_path / "nowhere")))
    with pytest.raises(InvalidRequest, match=r"^dataset: no such folder"):
        check_dataset(job)


def test_unreadable_image_is_refused_naming_it(tmp_path):
    job = TrainJob.model_validate(_job(tmp_path))
    (tmp_path / "data" / "img9.png").write_bytes(b"not a png")
    with pytest.raises(InvalidRequest, match=r"^dataset: img9.png: unreadable image"):
        check_job(job)


def test_untrainable_family_and_options_are_refused(tmp_path):
    edit = TrainJob.model_validate(_job(tmp_path, base_model="qwen_image_edit"))
    with pytest.raises(InvalidRequest, match="^base_model: training is not supported for qwen_ima"):
        check_job(edit)
    z_image = TrainJob.model_validate(_job(tmp_path, base_model="z_image", train_text_encoder=True))
    with pytest.raises(InvalidRequest, match="^config.train_text_encoder:"):
        check_job(z_image)
    warmup = TrainJob.model_validate(_job(tmp_path, lr_warmup_steps=50))
    with pytest.raises(InvalidRequest, match="^config.lr_warmup_steps:"):
        check_job(warmup)


def test_optional_optimizer_without_its_package_is_refused(tmp_path):
    import importlib.util

    job = TrainJob.model_validate(_job(tmp_path, optimizer="lion"))
    if importlib.util.find_spec("lion_pytorch") is not None:
        pytest.skip("lion_pytorch is installed")
    with pytest.raises(InvalidRequest, match="^config.optimizer: lion needs the lion_pytorch"):
        check_job(job)


def test_dataset_summary_and_captions(tmp_path):
    data = write_dataset(tmp_path / "data", captions=False)
    (data / "img0.txt").write_text("ohwx standing")
    job = TrainJob.model_validate(_job(tmp_path, max_train_steps=None))
    summary = check_dataset(job)
    assert summary.images == 4 and summary.total_steps == 400  # 100 x images
    assert summary.buckets == {"64x64": 4}
    assert with_trigger("", "ohwx") == "ohwx"  # no caption file: the trigger word alone
    assert with_trigger("a cat", "ohwx") == "ohwx, a cat"
    assert with_trigger("ohwx standing", "ohwx") == "ohwx standing"
    # Buckets keep the aspect ratio within the pixel budget; off, everything is square.
    assert bucket_size((2000, 1000), 1024, True) == (1408, 704)
    assert bucket_size((2000, 1000), 1024, False) == (1024, 1024)


def test_step_order_is_a_function_of_seed_and_step():
    buckets = [(64, 64)] * 3 + [(128, 64)] * 2
    a = StepOrder(buckets, batch_size=2, workers=2, repeats=2, seed=1)
    b = StepOrder(buckets, batch_size=2, workers=2, repeats=2, seed=1)
    for step in (0, 1, 7, 3, 12):
        assert a.batch(step, 0) == b.batch(step, 0) and a.batch(step, 1) == b.batch(step, 1)
        together = a.batch(step, 0) + a.batch(step, 1)
        assert len({buckets[i] for i in together}) == 1  # one bucket per global batch


def test_loss_curve_is_a_png():
    assert loss_curve_png([2.0, 1.5, 1.2, float("nan"), 1.0])[:4] == b"\x89PNG"


def test_cli_refuses_a_bad_config_with_the_field(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(tmp_path, rank=0)))
    result = subprocess.run(
        [sys.executable, "-m", "cluster.train", "--config", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "config.rank" in result.stderr


def test_image_urls_are_read_and_checked(tmp_path):
    from tests.file_server import FileServer

    data = write_dataset(tmp_path / "data")
    (data / "broken.png").write_bytes(b"\x89PNG broken")
    with FileServer(data) as server:
        good = _job(
            tmp_path,
            dataset=None,
            image_urls=[
                {"url": server.url("img0.png"), "caption": "a circle"},
                {"url": str(data / "img1.png")},
            ],
            # The test server is on loopback, at a port of its own: allowed here by name.
            url_rules={"allowed_networks": ["127.0.0.1/32"], "allowed_ports": "any"},
        )
        summary = check_dataset(TrainJob.model_validate(good))
        assert summary.images == 2 and summary.total_steps == 20
        bad = dict(good, image_urls=[*good["image_urls"], {"url": server.url("broken.png")}])
        with pytest.raises(InvalidRequest, match=r"^image_urls.2: unreadable image"):
            check_dataset(TrainJob.model_validate(bad))
        missing = dict(good, image_urls=[{"url": server.url("nothing.png")}])
        with pytest.raises(InvalidRequest, match=r"^image_urls.0: unreadable image"):
            check_dataset(TrainJob.model_validate(missing))
