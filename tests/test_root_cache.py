"""The node-local disk cache of LoRA root files: one download per file version, a budget, and
no cache where reading the root is already a local read.

An object-store root is stood for by fsspec's `memory://`, which is not a local folder, so the
cache's `auto` mode takes it as remote. Served end to end, the session's service reads through
the cache in `always` mode (tests/conftest.py; test_flux_serving.py checks a reload)."""

from __future__ import annotations

import concurrent.futures
import os
import uuid

import fsspec
import pytest
from pydantic import ValidationError

from deployments.config import LoraRootCacheConfig
from deployments.errors import LoraNotFound
from deployments.loras.root_cache import RootCache
from deployments.loras.store import LoraStore
from serve.config import AppConfig

FILE_BYTES = 10_000


def counts(cache: RootCache, *names: str) -> tuple[int, ...]:
    stats = cache.stats()
    return tuple(stats[name] for name in names)


@pytest.fixture
def bucket():
    """A fresh memory:// root and its file system, standing for an object store."""
    root = f"memory://bucket-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    yield root, fs
    if fs.exists(root.removeprefix("memory://")):
        fs.rm(root.removeprefix("memory://"), recursive=True)


def put(fs, root: str, name: str, data: bytes) -> None:
    fs.pipe(f"{root.removeprefix('memory://')}/{name}", data)


def root_cache(tmp_path, root: str, **overrides) -> RootCache:
    config = LoraRootCacheConfig(cache_dir=str(tmp_path / "root-cache"), **overrides)
    return RootCache(LoraStore(root), config)


def test_an_object_store_file_is_downloaded_once_per_version(tmp_path, bucket):
    root, fs = bucket
    first = os.urandom(FILE_BYTES)
    put(fs, root, "character-a.safetensors", first)
    cache = root_cache(tmp_path, root)
    ref = cache.store.resolve("character-a.safetensors")
    assert cache.read_bytes(ref) == first
    assert cache.read_bytes(ref) == first
    assert counts(cache, "downloads", "hits", "cached_files") == (1, 1, 1)

    # The copy serves its version without the store: gone from the store, still read.
    fs.rm(f"{root.removeprefix('memory://')}/character-a.safetensors")
    assert cache.read_bytes(ref) == first

    # A new file under the name is a new version, downloaded; the old copy stays until the
    # budget needs its room.
    second = os.urandom(FILE_BYTES + 1)
    put(fs, root, "character-a.safetensors", second)
    newer = cache.store.resolve("character-a.safetensors")
    assert newer.key != ref.key
    assert cache.read_bytes(newer) == second
    assert counts(cache, "downloads", "hits", "cached_files") == (2, 2, 2)


def test_the_replicas_of_a_node_download_a_file_once(tmp_path, bucket):
    root, fs = bucket
    data = os.urandom(FILE_BYTES)
    put(fs, root, "style.safetensors", data)
    # Two caches on one folder stand for two replica processes of one node.
    caches = [root_cache(tmp_path, root), root_cache(tmp_path, root)]
    ref = caches[0].store.resolve("style.safetensors")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: caches[i % 2].read_bytes(ref), range(8)))
    assert results == [data] * 8
    assert sum(cache.stats()["downloads"] for cache in caches) == 1
    assert sum(cache.stats()["hits"] for cache in caches) == 7


def test_what_the_folder_holds_is_read_again_only_after_a_read(tmp_path, bucket):
    """A replica reports its stats after every request; a request for a hot adapter reads no
    file, and its report does not scan the folder."""
    root, fs = bucket
    for name in "ab":
        put(fs, root, f"{name}.safetensors", os.urandom(FILE_BYTES))
    mine, other = root_cache(tmp_path, root), root_cache(tmp_path, root)  # two replicas
    mine.read_bytes(mine.store.resolve("a.safetensors"))
    assert counts(mine, "cached_files") == (1,)
    other.read_bytes(other.store.resolve("b.safetensors"))
    assert counts(mine, "cached_files") == (1,)  # as of its own last read
    mine.read_bytes(mine.store.resolve("b.safetensors"))
    assert counts(mine, "cached_files", "hits") == (2, 1)


def test_the_budget_keeps_the_most_recently_used_files(tmp_path, bucket):
    root, fs = bucket
    for index, name in enumerate("abc"):
        put(fs, root, f"{name}.safetensors", bytes([index]) * FILE_BYTES)
    cache = root_cache(tmp_path, root, cache_budget_bytes=int(FILE_BYTES * 2.5))
    refs = {name: cache.store.resolve(f"{name}.safetensors") for name in "abc"}
    for name in "abac":  # a is used again before c comes: b goes
        cache.read_bytes(refs[name])
    assert counts(cache, "downloads", "hits", "evictions", "cached_files") == (3, 1, 1, 2)
    assert cache.read_bytes(refs["a"]) == bytes([0]) * FILE_BYTES
    assert cache.read_bytes(refs["b"]) == bytes([1]) * FILE_BYTES  # evicted: downloaded again
    assert counts(cache, "downloads", "hits") == (4, 2)


def test_a_file_larger_than_the_budget_is_read_uncached(tmp_path, bucket):
    root, fs = bucket
    data = os.urandom(FILE_BYTES)
    put(fs, root, "big.safetensors", data)
    cache = root_cache(tmp_path, root, cache_budget_bytes=FILE_BYTES - 1)
    ref = cache.store.resolve("big.safetensors")
    assert cache.read_bytes(ref) == data
    assert counts(cache, "downloads", "cached_files") == (0, 0)
    assert not any(name.endswith(".part") for name in os.listdir(cache.cache.root))


def test_a_file_gone_from_the_store_is_not_found_and_leaves_nothing(tmp_path, bucket):
    root, fs = bucket
    put(fs, root, "brief.safetensors", b"x" * FILE_BYTES)
    cache = root_cache(tmp_path, root)
    ref = cache.store.resolve("brief.safetensors")
    fs.rm(f"{root.removeprefix('memory://')}/brief.safetensors")
    with pytest.raises(LoraNotFound, match="brief.safetensors"):
        cache.read_bytes(ref)
    assert counts(cache, "downloads", "cached_files") == (0, 0)
    assert not any(name.endswith(".part") for name in os.listdir(cache.cache.root))


def test_a_local_root_is_read_directly_unless_always(tmp_path, bucket):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "local.safetensors").write_bytes(b"y" * FILE_BYTES)
    auto = root_cache(tmp_path, str(folder))
    ref = auto.store.resolve("local.safetensors")
    assert auto.read_bytes(ref) == b"y" * FILE_BYTES
    assert auto.stats() is None
    assert not (tmp_path / "root-cache").exists()

    always = root_cache(tmp_path, str(folder), mode="always")  # a network mount, say
    always.read_bytes(ref)
    always.read_bytes(ref)
    assert counts(always, "downloads", "hits") == (1, 1)

    root, fs = bucket
    put(fs, root, "remote.safetensors", b"z")
    never = root_cache(tmp_path, root, mode="never")
    assert never.read_bytes(never.store.resolve("remote.safetensors")) == b"z"
    assert never.stats() is None


def test_config_names_the_field_it_refuses():
    base = {"models": [{"name": "flux", "family": "flux", "model_uri": "tiny://flux"}]}
    with pytest.raises(ValidationError, match="lora_root_cache.cache_dir: must not be"):
        AppConfig.model_validate(
            {
                **base,
                "remote_loras": {"cache_dir": "~/shared-cache"},
                "lora_root_cache": {"cache_dir": "~/shared-cache/"},
            }
        )
    with pytest.raises(ValidationError, match="lora_root_cache.mode"):
        AppConfig.model_validate({**base, "lora_root_cache": {"mode": "sometimes"}})
    with pytest.raises(ValidationError, match="lora_root_cache.cache_budget_bytes"):
        AppConfig.model_validate({**base, "lora_root_cache": {"cache_budget_bytes": 10}})
    assert AppConfig.model_validate(base).lora_root_cache.mode == "auto"
