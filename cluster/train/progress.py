"""What a run shows while it trains: status.json, the loss curve as PNG, sample images.

Written by rank 0 (and by the driver at start and end) under `<storage_path>/<run_name>/`;
the HTTP API reads the same files. Every write is whole-file, so a reader never sees half."""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
import uuid

from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageDraw

from cluster.train import metrics
from cluster.train.config import (
    CHECKPOINTS_FOLDER,
    LOSS_CURVE_FILE,
    SAMPLES_FOLDER,
    STATUS_FILE,
    RunStatus,
    TrainJob,
)
from deployments.storage import shared_root

CURVE_SIZE_PX = (640, 360)
CURVE_MARGIN_PX = 40
MAX_CURVE_POINTS = 2000


def write_file(uri: str, data: bytes) -> None:
    """Write in one step: a temporary file moved into place (a copy on object stores, which
    only show an object once it is complete)."""
    fs, path = shared_root(uri)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(temporary, data)
    if isinstance(fs, LocalFileSystem):
        os.replace(temporary, path)
    else:
        fs.mv(temporary, path)


def write_status(run_dir: str, status: RunStatus) -> None:
    write_file(posixpath.join(run_dir, STATUS_FILE), status.model_dump_json(indent=2).encode())
    metrics.record_progress(run_dir, status)


def read_status(run_dir: str) -> RunStatus | None:
    fs, path = shared_root(posixpath.join(run_dir, STATUS_FILE))
    try:
        return RunStatus.model_validate_json(fs.cat_file(path))
    except FileNotFoundError:
        return None


def loss_curve_png(losses: list[float]) -> bytes:
    """The loss per step as a line on axes, min and max labelled (drawn with PIL: matplotlib
    is not a dependency)."""
    width, height = CURVE_SIZE_PX
    margin = CURVE_MARGIN_PX
    image = Image.new("RGB", CURVE_SIZE_PX, "white")
    draw = ImageDraw.Draw(image)
    draw.line(
        [(margin, margin), (margin, height - margin), (width - margin, height - margin)], "black"
    )
    values = [v for v in losses if v == v][-MAX_CURVE_POINTS:]  # NaN dropped
    if values:
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        steps = max(len(values) - 1, 1)
        points = [
            (
                margin + (width - 2 * margin) * i / steps,
                height - margin - (height - 2 * margin) * (v - low) / span,
            )
            for i, v in enumerate(values)
        ]
        draw.line(points if len(points) > 1 else points * 2, fill=(30, 90, 200), width=2)
        draw.text((4, margin - 6), f"{high:.4g}", fill="black")
        draw.text((4, height - margin - 6), f"{low:.4g}", fill="black")
        draw.text((width - margin - 60, height - margin + 8), f"step {len(losses)}", fill="black")
    draw.text((margin, 10), "training loss", fill="black")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_loss_curve(run_dir: str, losses: list[float]) -> None:
    write_file(posixpath.join(run_dir, LOSS_CURVE_FILE), loss_curve_png(losses))


def sample_name(step: int, index: int) -> str:
    return f"step-{step:06d}-{index}.png"


def write_sample(run_dir: str, step: int, index: int, image: Image.Image) -> str:
    """Save one sample image; returns its name under samples/."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    name = sample_name(step, index)
    write_file(posixpath.join(run_dir, SAMPLES_FOLDER, name), out.getvalue())
    return name


def list_checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoint folders (`checkpoint_<time>`), oldest first."""
    fs, path = shared_root(posixpath.join(run_dir, CHECKPOINTS_FOLDER))
    try:
        found = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = [posixpath.basename(info["name"]) for info in found if info["type"] == "directory"]
    return sorted(name for name in names if name.startswith("checkpoint_"))


def run_name_for(job: TrainJob) -> str:
    """The run's folder under storage_path: `run_name`, else the output file's stem."""
    if job.run_name:
        return job.run_name
    return job.output_file.removesuffix(".safetensors").replace("/", "-")


def run_dir_for(job: TrainJob) -> str:
    return posixpath.join(absolute_location(job.storage_path), run_name_for(job))


def absolute_location(location: str) -> str:
    """A local path made absolute (Ray Train needs it; workers may run elsewhere), URIs as is."""
    if "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location or tempfile.gettempdir()))
