"""Tiny training jobs for tests: a generated dataset of colored shapes, a job config, and the
published LoRA read back and rendered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cluster.train.config import TrainJob
from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.family import get_family
from deployments.loras.files import parse_lora_file
from deployments.loras.formats import apply_metadata_alpha
from deployments.loras.store import LoraStore

COLORS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 30)]
SHAPES = ["circle", "square", "circle", "square"]


def write_dataset(folder: Path, count: int = 4, size: int = 64, captions: bool = True) -> Path:
    """`count` images of a colored shape on grey, with `<name>.txt` captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        color, shape = COLORS[i % len(COLORS)], SHAPES[i % len(SHAPES)]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
        image.save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a {shape} on grey")
    return folder


def tiny_job(tmp: Path, family: str, dataset: Path, **config) -> TrainJob:
    settings = {
        "rank": 4,
        "alpha": 4.0,
        "learning_rate": 2e-2,
        "max_train_steps": 20,
        "resolution": 64,
        "save_every": 10,
        "seed": 0,
        "num_workers": 1,
        "cache_latents": True,
        "max_failures": 1,
    }
    settings.update(config)
    return TrainJob(
        base_model=family,
        dataset=str(dataset),
        trigger_word="ohwx",
        character_id=f"{family}-test",
        lora_root=str(tmp / "loras"),
        storage_path=str(tmp / "runs"),
        config=settings,
    )


def render(pipe, family: str, adapter: str | None = None, tensors=None, metadata=None):
    """The tiny pipeline's output for a fixed prompt (Wan: a one-frame video), as floats, with
    the adapter loaded when given."""
    adapters = PipelineAdapters(pipe, get_family(family))
    if tensors is not None:
        adapters.load(adapter, apply_metadata_alpha(tensors, metadata), adapter)
        adapters.activate([ActiveAdapter(adapter, 1.0, 1.0)])
    else:
        adapters.activate([])
    video = get_family(family).output == "video"
    output = pipe(
        prompt="ohwx, a circle on grey",
        width=64,
        height=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **({"num_frames": 1} if video else {}),
    )
    if tensors is not None:
        adapters.delete(adapter)
    return np.asarray(output.frames[0] if video else output.images[0], dtype=np.float32)


def load_published(job, name: str | None = None):
    store = LoraStore(job.lora_root)
    ref = store.resolve(name or job.output_file)
    return parse_lora_file(store.read_bytes(ref), ref.name)
