"""Base-model loading: tiny://, a local folder, file:// and fsspec URIs give the same model."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import deployments.loading
from deployments import load_pipeline
from deployments.errors import ModelLoadError

PROMPT = "a red fox in the snow"
SMALL = {"width": 128, "height": 128, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("flux", "tiny://flux")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    """The tiny pipeline written with save_pretrained, as a production checkpoint would be."""
    folder = tmp_path_factory.mktemp("models") / "tiny-flux"
    tiny.save_pretrained(folder)
    return folder


@pytest.fixture
def memory_folder():
    """A fresh folder in fsspec's process-wide memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    path = f"/loraplex-tests/{uuid.uuid4().hex}"
    yield fs, path
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    cache = tmp_path / "model-cache"
    monkeypatch.setattr(deployments.loading, "MODEL_CACHE_DIR", cache)
    return cache


def image(pipe, seed: int = 0) -> np.ndarray:
    with torch.inference_mode():
        result = pipe(
            PROMPT,
            **SMALL,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )
    return result.images[0]


def test_tiny_flux_is_a_flux_pipeline_deterministic_per_seed(tiny):
    assert isinstance(tiny, FluxPipeline)
    assert tiny.dtype == torch.float32 and tiny.device.type == "cpu"
    first = image(tiny, seed=3)
    assert first.shape == (128, 128, 3)
    assert np.array_equal(image(tiny, seed=3), first)
    assert not np.array_equal(image(tiny, seed=4), first)


def test_two_tiny_builds_are_identical(tiny):
    assert np.array_equal(image(load_pipeline("flux", "tiny://flux")), image(tiny))


def test_saved_model_loads_from_a_folder_and_a_file_uri(tiny, saved):
    expected = image(tiny)
    assert np.array_equal(image(load_pipeline("flux", str(saved))), expected)
    assert np.array_equal(image(load_pipeline("flux", f"file://{saved}")), expected)


def test_fsspec_model_is_copied_once_into_the_cache(tiny, saved, memory_folder, model_cache):
    fs, path = memory_folder
    fs.put(str(saved), path, recursive=True)
    uri = f"memory://{path}"
    assert np.array_equal(image(load_pipeline("flux", uri)), image(tiny))
    [copied] = model_cache.iterdir()
    assert (copied / "model_index.json").exists()
    fs.rm(path, recursive=True)  # a second load reads the cached copy, not the source
    assert np.array_equal(image(load_pipeline("flux", uri)), image(tiny))


def test_tiny_model_of_another_family_is_refused():
    with pytest.raises(ModelLoadError, match="not a flux model"):
        load_pipeline("flux", "tiny://sdxl")


def test_folder_without_a_model_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="cannot load flux model"):
        load_pipeline("flux", str(empty))


def test_fsspec_folder_without_model_index_is_refused(saved, memory_folder, model_cache):
    fs, path = memory_folder
    fs.put(str(saved / "transformer"), f"{path}/transformer", recursive=True)
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline("flux", f"memory://{path}")
    assert not any((p / "model_index.json").exists() for p in model_cache.glob("*"))


def test_replicas_copying_the_same_model_at_once_both_succeed(saved, memory_folder, model_cache):
    fs, path = memory_folder
    fs.put(str(saved), path, recursive=True)
    target = model_cache / "same-model"
    deployments.loading._copy_tree(f"memory://{path}", target)
    deployments.loading._copy_tree(f"memory://{path}", target)  # the slower one's rename fails
    assert (target / "model_index.json").exists()
    assert [p.name for p in model_cache.iterdir()] == ["same-model"]  # no partial copy left


def test_hub_id_loads_from_the_hub_cache_offline(tiny, saved, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache, as on a node that pre-pulled the
    weights; with HF_HUB_OFFLINE=1 nothing is downloaded. The cache layout is the hub's own:
    models--<org>--<name>/snapshots/<revision>/ with refs/main naming the revision."""
    import shutil

    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--loraplex-test--tiny-flux"
    shutil.copytree(saved, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hub = load_pipeline("flux", "loraplex-test/tiny-flux")
    assert isinstance(from_hub, FluxPipeline)
    assert np.array_equal(image(from_hub), image(tiny))


def test_unknown_hub_id_is_a_clear_load_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="loraplex-test/absent"):
        load_pipeline("flux", "loraplex-test/absent")
