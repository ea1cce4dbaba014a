"""The LoRA store: names resolve under the root, and never outside it."""

from __future__ import annotations

import os

import fsspec
import pytest

from serve.errors import LoraNotFound
from serve.loras.store import LoraStore


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
