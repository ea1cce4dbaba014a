"""The LoRA store: names resolve under the root, and never outside it."""

from __future__ import annotations

import os
import time

import fsspec
import pytest
import torch

from deployments.errors import LoraNotFound
from deployments.loras.store import LoraStore


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "loras"
    (root / "styles").mkdir(parents=True)
    (root / "character-abc.safetensors").write_bytes(b"x")
    (root / "styles" / "anime.safetensors").write_bytes(b"y")
    return LoraStore(str(root))


def test_names_and_subfolders_resolve(store):
    assert store.resolve("character-abc.safetensors").name == "character-abc.safetensors"
    assert store.resolve("styles/anime.safetensors").name == "styles/anime.safetensors"


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "styles/../../outside.safetensors",
        "/etc/passwd.safetensors",
        "file:///tmp/outside.safetensors",
        "styles//anime.safetensors",
        "./character-abc.safetensors",
        "character-abc.ckpt",
        "character-abc.safetensors.txt",
        "C:/x.safetensors",
        "a\\b.safetensors",
        "",
    ],
)
def test_names_that_leave_the_root_or_are_not_safetensors_are_refused(store, name):
    with pytest.raises(LoraNotFound):
        store.resolve(name)


def test_a_real_file_outside_the_root_stays_unreachable(store, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    with pytest.raises(LoraNotFound):
        store.resolve("../outside.safetensors")


def test_symlink_out_of_the_root_is_refused(store, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "loras" / "link.safetensors")
    with pytest.raises(LoraNotFound):
        store.resolve("link.safetensors")


def test_missing_file_and_folder_are_not_found(store):
    with pytest.raises(LoraNotFound, match="LoRA not found: nope.safetensors"):
        store.resolve("nope.safetensors")


def test_version_changes_when_the_file_changes(store, tmp_path):
    before = store.resolve("character-abc.safetensors")
    (tmp_path / "loras" / "character-abc.safetensors").write_bytes(b"longer content")
    after = store.resolve("character-abc.safetensors")
    assert before.key != after.key
    assert store.read_bytes(after) == b"longer content"


def test_fsspec_memory_root():
    fs = fsspec.filesystem("memory")
    fs.pipe("/lorastore/character-m.safetensors", b"mem")
    store = LoraStore("memory://lorastore")
    ref = store.resolve("character-m.safetensors")
    assert store.read_bytes(ref) == b"mem"
    with pytest.raises(LoraNotFound):
        store.resolve("character-missing.safetensors")


def test_a_recent_resolve_answers_for_max_age_s(store, tmp_path):
    path = tmp_path / "loras" / "character-abc.safetensors"
    first = store.resolve("character-abc.safetensors")
    path.write_bytes(b"overwritten by another process")
    # Within max_age_s the version resolved before answers; without, the root does.
    assert store.resolve("character-abc.safetensors", max_age_s=60) == first
    fresh = store.resolve("character-abc.safetensors")
    assert fresh != first
    assert store.resolve("character-abc.safetensors", max_age_s=60) == fresh
    path.write_bytes(b"and again")
    time.sleep(0.06)
    assert store.resolve("character-abc.safetensors", max_age_s=0.05) != fresh


def test_absence_is_never_remembered(store, tmp_path):
    with pytest.raises(LoraNotFound):
        store.resolve("character-new.safetensors", max_age_s=60)
    (tmp_path / "loras" / "character-new.safetensors").write_bytes(b"published")
    assert store.resolve("character-new.safetensors", max_age_s=60).name


def test_a_file_deleted_elsewhere_is_gone_once_its_resolve_is_old(store, tmp_path):
    store.resolve("styles/anime.safetensors")
    (tmp_path / "loras" / "styles" / "anime.safetensors").unlink()
    assert store.resolve("styles/anime.safetensors", max_age_s=60)  # the documented window
    with pytest.raises(LoraNotFound):
        store.resolve("styles/anime.safetensors")
    with pytest.raises(LoraNotFound):  # and not remembered since
        store.resolve("styles/anime.safetensors", max_age_s=60)


def test_the_stores_own_writes_and_deletes_are_seen_at_once(store):
    before = store.resolve("character-abc.safetensors", max_age_s=60)
    written = store.write("character-abc.safetensors", b"replaced through this store")
    assert written != before
    assert store.resolve("character-abc.safetensors", max_age_s=60) == written
    store.delete("character-abc.safetensors")
    with pytest.raises(LoraNotFound):
        store.resolve("character-abc.safetensors", max_age_s=60)


def test_metadata_is_read_once_per_version(tmp_path):
    from deployments.loras.synthetic import write_lora

    root = tmp_path / "meta"
    root.mkdir()
    tensors = {"a.lora_A.weight": torch.ones(2, 4), "a.lora_B.weight": torch.ones(4, 2)}
    write_lora(root / "character-m.safetensors", tensors, {"trigger_words": "first"})
    store = LoraStore(str(root))
    first = store.resolve("character-m.safetensors")
    assert store.read_metadata(first)["trigger_words"] == "first"
    write_lora(root / "character-m.safetensors", tensors, {"trigger_words": "second, longer"})
    second = store.resolve("character-m.safetensors")
    assert store.read_metadata(second)["trigger_words"] == "second, longer"
    assert store.read_metadata(first)["trigger_words"] == "first"  # that version's, remembered


@pytest.mark.parametrize("seconds", [-1, 3601, "soon"])
def test_lora_resolve_cache_s_is_bounded(seconds):
    from pydantic import ValidationError

    from serve.config import AppConfig

    base = {"models": [{"name": "flux", "family": "flux", "model_uri": "tiny://flux"}]}
    assert AppConfig.model_validate(base).lora_resolve_cache_s == 0
    with pytest.raises(ValidationError, match="lora_resolve_cache_s"):
        AppConfig.model_validate({**base, "lora_resolve_cache_s": seconds})
