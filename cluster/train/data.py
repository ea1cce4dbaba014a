"""The training images: read, checked, captioned, bucketed by aspect ratio, ordered per step.

`check_dataset` runs before any worker starts (the CLI and `POST /train` call it) and raises
InvalidRequest naming the field; the workers then read the same files with `load_images`."""

from __future__ import annotations

import hashlib
import posixpath
import random
from dataclasses import dataclass

import fsspec
import httpx
import torch
from PIL import Image, UnidentifiedImageError

from cluster.train.config import TrainJob
from deployments.errors import InvalidRequest
from deployments.media import MAX_DATASET_IMAGE_PIXELS, load_image
from deployments.outbound import check_url, fetch_bytes
from deployments.storage import shared_root

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUCKET_STEP_PX = 64  # every family's VAE x patch size divides it
MAX_ASPECT_RATIO = 2.0
FETCH_TIMEOUT_S = 30.0
HTTP_SCHEMES = ("http://", "https://")
MAX_IMAGE_BYTES = 256 * 1024**2  # an image by URL is refused once over this, as it arrives


@dataclass(frozen=True)
class Item:
    source: str
    """A path or URI the image is read from."""
    caption: str
    """The caption with the trigger word, as the model is trained on it."""


@dataclass(frozen=True)
class DatasetSummary:
    images: int
    dataset_hash: str
    """sha256 over every image's bytes and caption, in order."""
    total_steps: int
    """max_train_steps, or 100 x the number of images."""
    buckets: dict[str, int]
    """'<width>x<height>' -> images in it."""


def with_trigger(caption: str, trigger_word: str) -> str:
    """The caption with the trigger word in front when absent; the trigger alone if empty."""
    caption = caption.strip()
    if not trigger_word or trigger_word in caption:
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def list_items(job: TrainJob) -> list[Item]:
    """The job's images with their captions, sorted by file name (URLs in the given order)."""
    if job.image_urls:
        return [Item(u.url, with_trigger(u.caption, job.trigger_word)) for u in job.image_urls]
    location = str(job.dataset)
    if "://" not in location and not location.startswith(("/", ".")):
        location = posixpath.join(job.dataset_root, location)
    fs, root = shared_root(location)
    try:
        names = sorted(p for p in fs.ls(root, detail=False))
    except (FileNotFoundError, NotADirectoryError) as e:
        raise InvalidRequest(f"dataset: no such folder: {job.dataset}") from e
    protocol = location.split("://")[0] + "://" if "://" in location else ""
    items = []
    for path in names:
        stem, suffix = posixpath.splitext(path)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            caption = fs.cat_file(stem + ".txt").decode("utf-8")
        except FileNotFoundError:
            caption = ""  # no caption file: the trigger word alone
        items.append(Item(protocol + path, with_trigger(caption, job.trigger_word)))
    return items


def read_bytes(job: TrainJob, source: str, field: str = "image_urls") -> bytes:
    """An image's bytes. An http(s) image URL is fetched under the job's `url_rules`, every
    redirect re-checked (deployments/outbound.py); other image URLs obey the rules' schemes
    and hosts when the server set them; dataset files are read as they are listed."""
    if job.image_urls and source.lower().startswith(HTTP_SCHEMES):
        return fetch_bytes(source, job.url_rules, field, MAX_IMAGE_BYTES, FETCH_TIMEOUT_S)
    if job.image_urls and job.url_rules.allowed_hosts is not None:
        check_url(source, job.url_rules, field)
    with fsspec.open(source, "rb") as file:
        return file.read()


def open_image(data: bytes, field: str = "image") -> Image.Image:
    """RGB pixels, decoded within deployments/media.py's formats and pixel limit (an image by
    URL is checked nowhere else before this)."""
    with load_image(data, field, MAX_DATASET_IMAGE_PIXELS) as image:
        return image.convert("RGB")


def check_dataset(job: TrainJob) -> DatasetSummary:
    """Read and decode every image once: InvalidRequest naming `dataset` / `image_urls.<i>`
    for an empty dataset or an image that cannot be read."""
    field = "image_urls" if job.image_urls else "dataset"
    items = list_items(job)
    if not items:
        raise InvalidRequest(f"{field}: no images found (expected {', '.join(IMAGE_SUFFIXES)})")
    digest = hashlib.sha256()
    buckets: dict[str, int] = {}
    for index, item in enumerate(items):
        label = (
            f"image_urls.{index}"
            if job.image_urls
            else f"dataset: {posixpath.basename(item.source)}"
        )
        try:
            data = read_bytes(job, item.source, f"image_urls.{index}.url")
            image = open_image(data, label)
        except (OSError, UnidentifiedImageError, httpx.HTTPError, ValueError) as e:
            raise InvalidRequest(f"{label}: unreadable image ({e})") from e
        digest.update(hashlib.sha256(data).digest())
        digest.update(item.caption.encode())
        width, height = bucket_size(
            image.size, job.config.resolution, job.config.aspect_ratio_buckets
        )
        key = f"{width}x{height}"
        buckets[key] = buckets.get(key, 0) + 1
    total = job.config.max_train_steps or 100 * len(items)
    return DatasetSummary(len(items), digest.hexdigest(), total, buckets)


def bucket_size(size: tuple[int, int], resolution: int, buckets: bool) -> tuple[int, int]:
    """The (width, height) an image is trained at: resolution^2 pixels or fewer, sides in steps
    of BUCKET_STEP_PX, aspect ratio as close to the image's as that allows (capped at 2:1);
    square when buckets are off."""
    if not buckets:
        side = max(BUCKET_STEP_PX, resolution // BUCKET_STEP_PX * BUCKET_STEP_PX)
        return side, side
    ratio = min(max(size[0] / size[1], 1 / MAX_ASPECT_RATIO), MAX_ASPECT_RATIO)
    width = (resolution * ratio**0.5) // BUCKET_STEP_PX * BUCKET_STEP_PX
    height = (resolution / ratio**0.5) // BUCKET_STEP_PX * BUCKET_STEP_PX
    return int(max(width, BUCKET_STEP_PX)), int(max(height, BUCKET_STEP_PX))


def to_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """Resize to cover (width, height), center-crop, and scale to [-1, 1] CHW."""
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    data = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass
class Sample:
    pixels: torch.Tensor
    caption: str
    bucket: tuple[int, int]


def load_images(job: TrainJob) -> list[Sample]:
    samples = []
    for item in list_items(job):
        image = open_image(read_bytes(job, item.source))
        width, height = bucket_size(
            image.size, job.config.resolution, job.config.aspect_ratio_buckets
        )
        samples.append(Sample(to_pixels(image, width, height), item.caption, (width, height)))
    return samples


class StepOrder:
    """Which samples each worker trains on at each micro-step: a pure function of the seed and
    the micro-step, so a run resumed at step N sees exactly what an uninterrupted one would.

    An epoch shuffles each bucket's images (x repeats), cuts them into global batches of
    batch_size x workers from one bucket each, and shuffles the batches."""

    def __init__(
        self, buckets: list[tuple[int, int]], batch_size: int, workers: int, repeats: int, seed: int
    ):
        self.buckets = buckets
        self.global_batch = batch_size * workers
        self.batch_size = batch_size
        self.workers = workers
        self.repeats = repeats
        self.seed = seed
        self._epochs: dict[int, list[list[int]]] = {}

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            by_bucket: dict[tuple[int, int], list[int]] = {}
            for index, bucket in enumerate(self.buckets):
                by_bucket.setdefault(bucket, []).extend([index] * self.repeats)
            batches = []
            for bucket in sorted(by_bucket):
                indices = by_bucket[bucket]
                rng.shuffle(indices)
                for start in range(0, len(indices), self.global_batch):
                    chunk = indices[start : start + self.global_batch]
                    # Every worker needs a full batch: a short last batch is topped up from
                    # the start of its bucket.
                    while len(chunk) < self.global_batch:
                        chunk.append(indices[len(chunk) % len(indices)])
                    batches.append(chunk)
            rng.shuffle(batches)
            self._epochs = {epoch: batches}  # only the current epoch is kept
        return self._epochs[epoch]

    def batch(self, micro_step: int, rank: int) -> list[int]:
        per_epoch = len(self._epoch(0))  # every epoch has the same number of batches
        epoch, position = divmod(micro_step, per_epoch)
        chunk = self._epoch(epoch)[position]
        return chunk[rank * self.batch_size : (rank + 1) * self.batch_size]
