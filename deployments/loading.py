"""Base-model loading: `tiny://<family>`, a local directory, an fsspec URI, or a hub id."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import fsspec
import torch

from deployments.errors import ModelLoadError
from deployments.family import get_family

TINY_SCHEME = "tiny://"
LOCAL_PROTOCOLS = ("file", "local")
MODEL_CACHE_DIR = Path(os.environ.get("LORAPLEX_MODEL_CACHE", "~/.cache/loraplex/models"))


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_pipeline(family: str, model_uri: str, dtype: str = "auto", device: str = "auto"):
    """The diffusers pipeline a deployment of `family` serves for `model_uri`."""
    spec = get_family(family)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if model_uri.startswith(TINY_SCHEME):
        tiny_family = model_uri[len(TINY_SCHEME) :]
        if tiny_family != family:
            raise ModelLoadError(f"model_uri {model_uri!r} is not a {family} model")
        pipe = spec.build_tiny()
    else:
        source = _local_source(model_uri)
        try:
            pipe = spec.pipeline_class.from_pretrained(source, dtype=torch_dtype)
        except Exception as e:
            raise ModelLoadError(f"cannot load {family} model from {model_uri!r}: {e}") from e
    if pipe.dtype != torch_dtype:  # casting a model already in its dtype only logs warnings
        pipe.to(dtype=torch_dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _local_source(model_uri: str) -> str:
    """A local directory for file and fsspec URIs (remote ones copied once); hub ids as is."""
    protocol, _, path = model_uri.partition("://")
    if not path:
        return model_uri  # a local path or a hub id: from_pretrained tells them apart
    if protocol in LOCAL_PROTOCOLS:
        return path
    target = MODEL_CACHE_DIR.expanduser() / hashlib.sha256(model_uri.encode()).hexdigest()[:24]
    if not (target / "model_index.json").exists():
        _copy_tree(model_uri, target)
    return str(target)


def _copy_tree(model_uri: str, target: Path) -> None:
    # Copy into a private sibling folder and rename, so a half-copied model is never taken for
    # whole; replicas starting together may race, and the first rename wins.
    fs, root = fsspec.core.url_to_fs(model_uri)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        fs.get(root.rstrip("/") + "/", str(partial) + "/", recursive=True)
        if not (partial / "model_index.json").exists():
            raise ModelLoadError(f"{model_uri!r} holds no diffusers model (no model_index.json)")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
    except ModelLoadError:
        raise
    except OSError as e:
        if (target / "model_index.json").exists():
            return  # another replica finished the same copy first
        raise ModelLoadError(f"cannot copy model from {model_uri!r}: {e}") from e
    except Exception as e:
        raise ModelLoadError(f"cannot copy model from {model_uri!r}: {e}") from e
    finally:
        shutil.rmtree(partial, ignore_errors=True)
