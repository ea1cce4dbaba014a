"""A node-local cache of a compiled denoiser's artifacts, so a replica started on a node that has
compiled the same model before answers its first request without compiling from scratch.

Two things are kept under `cache_dir`:
- `<key>.megacache`: PyTorch's portable compile artifacts (`torch.compiler.save_cache_artifacts`,
  the "mega-cache": AOTAutograd and inductor FX graph cache entries, autotuning results; on
  CUDA the Triton kernels too). Hot-loaded into a fresh process, they spare it the lowering
  of every graph. One file: it can also be copied to another node.
- `inductor/`: inductor's own on-disk cache: `load` sets TORCHINDUCTOR_CACHE_DIR to it for the
  replica's process. On a CPU the artifacts carry each C++ kernel as source only, so a process
  that has them still runs g++ on every kernel, most of a CPU compile (the tiny Flux's blocks:
  about 27 CPU seconds of g++, 6 of lowering). The built kernels live in this folder, and
  kept beside the artifacts they spare that too. inductor's default folder sits under /tmp,
  which a container restart wipes (and importing torch._dynamo already sets the variable to
  it, so a value found there says nothing of an operator's choice).

Dynamo still traces each block's bytecode in the new process (a second or two); only what
comes after is cached. Artifacts from another torch, device or model would be useless, so each
such combination has its own key (`cache_key`). The file is a pickle, as PyTorch writes it:
`cache_dir` must be the replica's own, never a folder others may write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from deployments.config import ModelConfig
from deployments.loading import resolve_dtype

logger = logging.getLogger("ray.serve")

INDUCTOR_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
ARTIFACTS_SUFFIX = ".megacache"
# The file is this magic, the payload's sha256, then the payload: a torn or altered file is
# recognised before torch unpickles it.
MAGIC = b"LXCC0001"
DIGEST_BYTES = 32


def cache_key(model: ModelConfig, device: str) -> str:
    """A file-name-safe key that changes with whatever makes compiled artifacts invalid: the
    model (family, model_uri, dtype as resolved on `device`), the device kind and GPU name, the
    software that generates the graphs (torch, CUDA, Python, diffusers, peft) and the compile
    config's backend and mode. `device` as torch names it: "cpu", "cuda", "cuda:0"."""
    kind = torch.device(device).type
    parts = {
        "family": model.family,
        "model_uri": model.model_uri,
        "dtype": str(resolve_dtype(model.dtype, kind)),
        "device": kind,
        "gpu": torch.cuda.get_device_name(torch.device(device)) if kind == "cuda" else "",
        "machine": platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "diffusers": version("diffusers"),
        "peft": version("peft"),
        "backend": model.compile.backend,
        "mode": model.compile.mode,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"{model.family}-{kind}-{digest[:24]}"


class CompileCache:
    """One model's artifacts in `cache_dir` (None: off; `~` is the replica's home). Neither
    method raises: an unreadable cache is a miss, and one that cannot be written is logged."""

    def __init__(self, cache_dir: str | None, key: str):
        self.folder = None if cache_dir is None else Path(cache_dir).expanduser()
        self.key = key

    @property
    def path(self) -> Path | None:
        """The artifacts file, or None when the cache is off."""
        return None if self.folder is None else self.folder / f"{self.key}{ARTIFACTS_SUFFIX}"

    def load(self) -> bool:
        """Before the first compile: point inductor's on-disk cache at `cache_dir`/inductor and
        hot-load the artifacts file. True on a hit (the file was there and torch took it)."""
        if self.path is None:
            return False
        # inductor reads the variable at each use (only precompile's cache, unused here, binds
        # it at import), so set before the first compile it holds every kernel built after.
        os.environ[INDUCTOR_DIR_ENV] = str(self.folder / "inductor")
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            logger.info("compile cache miss: no %s", self.path)
            return False
        except OSError as e:
            logger.warning("compile cache miss: cannot read %s: %s", self.path, e)
            return False
        payload = _checked_payload(data)
        if payload is None:
            logger.warning(
                "compile cache miss: %s is corrupt (ignored, replaced on save)", self.path
            )
            return False
        try:
            info = torch.compiler.load_cache_artifacts(payload)
        except Exception as e:  # noqa: BLE001 - any failure here is a miss, never a failed replica
            logger.warning("compile cache miss: torch could not load %s: %s", self.path, e)
            return False
        if info is None:  # torch logged why
            logger.warning("compile cache miss: torch could not load %s", self.path)
            return False
        logger.info(
            "compile cache hit: %s (%d inductor, %d AOTAutograd artifacts)",
            self.path,
            len(info.inductor_artifacts),
            len(info.aot_autograd_artifacts),
        )
        return True

    def save(self) -> None:
        """After the warm-up: write the artifacts of everything compiled, or loaded from a
        cache and used, in this process, atomically (a temporary file renamed over the old),
        unless the file already holds exactly these."""
        if self.path is None:
            return
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as e:  # noqa: BLE001 - a replica serves without a cache file
            logger.warning("compile cache not saved: torch could not serialise: %s", e)
            return
        if saved is None:
            logger.info("compile cache not saved: nothing was compiled")
            return
        data = MAGIC + hashlib.sha256(saved[0]).digest() + saved[0]
        try:
            if self.path.is_file() and self.path.read_bytes() == data:
                return
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.path, data)
        except OSError as e:
            logger.warning("compile cache not saved to %s: %s", self.path, e)
            return
        logger.info("compile cache saved: %s (%d bytes)", self.path, len(data))


def _checked_payload(data: bytes) -> bytes | None:
    """The payload of a cache file, or None when its header or digest does not match."""
    header = len(MAGIC) + DIGEST_BYTES
    if len(data) <= header or not data.startswith(MAGIC):
        return None
    payload = data[header:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC) : header]:
        return None
    return payload


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never part of one: several replicas of a node
    may save at once, and the last rename wins."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
