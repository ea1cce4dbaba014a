"""Training throughput and memory of the tiny Flux job with 1 and 2 workers, on CPU.

    python -m cluster.train.throughput [--steps 60] [--workers 1 2]

Each run trains the same LoRA (4 generated 64x64 images, rank 4) and prints steps per second
(rank 0's, over the training steps only: model loading and Ray start-up excluded) and each
worker's peak resident memory (ru_maxrss)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 30)]


def make_dataset(folder: Path, count: int = 4, size: int = 64) -> Path:
    """Colored circles and squares on grey, each with a caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        shape = "circle" if i % 2 == 0 else "square"
        box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[i % 4])
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {shape} on grey")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--family", default="flux")
    parser.add_argument("--make-dataset", metavar="FOLDER", help="only write the dataset")
    args = parser.parse_args()
    if args.make_dataset:
        print(make_dataset(Path(args.make_dataset)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from cluster.train.config import TrainJob
    from cluster.train.run import run

    ray.init(num_cpus=max(args.workers) + 1, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-train-bench-"))
    dataset = make_dataset(tmp / "data")
    for workers in args.workers:
        job = TrainJob(
            base_model=args.family,
            dataset=str(dataset),
            trigger_word="ohwx",
            output_name=f"bench-{workers}",
            lora_root=str(tmp / "loras"),
            storage_path=str(tmp / "runs"),
            config={
                "rank": 4,
                "learning_rate": 2e-2,
                "max_train_steps": args.steps,
                "resolution": 64,
                "save_every": args.steps,
                "num_workers": workers,
                "cache_latents": True,
            },
        )
        status = run(job)
        print(
            f"{args.family} workers={workers} state={status.state} steps={status.step} "
            f"steps_per_s={status.steps_per_s:.1f} "
            f"images_per_s={status.steps_per_s * workers:.1f} "
            f"peak_rss_mb={status.peak_rss_mb}",
            flush=True,
        )
    ray.shutdown()
    shutil.rmtree(tmp)  # the dataset, checkpoints and LoRAs of this run


if __name__ == "__main__":
    main()
