"""The node-local disk cache both LoRA caches use (deployments/loras/disk_cache.py): its lock
files go with the files they guard. What it caches is tested through its users:
test_root_cache.py and test_remote_loras.py."""

from __future__ import annotations

import concurrent.futures
import os

import pytest
from filelock import FileLock

from deployments.loras.disk_cache import DiskCache

FILE_BYTES = 1000


def content(key: str) -> bytes:
    return key.encode().ljust(FILE_BYTES, b".")


def writer(key: str):
    def fill(out) -> int:
        return out.write(content(key))

    return fill


def failing(out) -> int:
    raise ConnectionError("the store went away")


def cache_in(folder, files: int = 2) -> DiskCache:
    return DiskCache(str(folder), FILE_BYTES * files, lock_wait_s=30, stale_part_s=3600)


def names(cache: DiskCache, suffix: str) -> set[str]:
    return {name.removesuffix(suffix) for name in os.listdir(cache.root) if name.endswith(suffix)}


def test_an_evicted_files_lock_goes_with_it(tmp_path):
    cache = cache_in(tmp_path)
    for key in "abcd":
        assert cache.fetch(key, writer(key)) == content(key)
    assert names(cache, ".safetensors") == {"c", "d"}
    assert names(cache, ".lock") == {"c", "d", ".cache"}  # the folder's own lock stays
    assert cache.fetch("a", writer("a")) == content("a")  # evicted: fetched again, locked anew
    assert names(cache, ".lock") == {"a", "d", ".cache"}


def test_a_failed_fills_lock_goes_at_the_next_fill(tmp_path):
    cache = cache_in(tmp_path)
    with pytest.raises(ConnectionError):
        cache.fetch("broken", failing)
    assert "broken" in names(cache, ".lock")
    cache.fetch("a", writer("a"))
    assert names(cache, ".lock") == {"a", ".cache"}
    assert not names(cache, ".part")


def test_a_lock_someone_holds_is_kept(tmp_path):
    cache = cache_in(tmp_path)
    cache.root.mkdir(parents=True, exist_ok=True)
    with FileLock(cache.root / "busy.lock"):  # a fill of "busy" under way in another process
        cache.fetch("a", writer("a"))
        assert "busy" in names(cache, ".lock")
    cache.fetch("b", writer("b"))
    assert "busy" not in names(cache, ".lock")


def test_fills_and_evictions_from_many_threads_give_each_key_its_bytes(tmp_path):
    cache = cache_in(tmp_path, files=3)
    keys = [f"k{index}" for index in range(6)] * 8
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        fetched = list(pool.map(lambda key: cache.fetch(key, writer(key)), keys))
    assert fetched == [content(key) for key in keys]
    assert len(names(cache, ".safetensors")) <= 3
    assert not names(cache, ".part")
    cache.fetch("last", writer("last"))  # a fill with nothing else under way
    assert names(cache, ".lock") - {".cache"} == names(cache, ".safetensors")
