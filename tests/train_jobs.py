"""Tiny training jobs for tests: a generated dataset of colored shapes, and a job config."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from cluster.train.config import TrainJob

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
