"""A node-local disk cache of files by key, within a byte budget.

Used for LoRAs fetched by URL (`remote.py`) and for files read from a LoRA root on an object
store or a network mount (`root_cache.py`). Every replica process of a node shares the folder.

A key names one immutable file: the caller puts whatever identifies the content (a URL's
digest, a store file's version) into it. The cache keeps at most `budget_bytes`, dropping the
least recently used files first; a file's modification time is its last use.

One fill per key at a time, across threads and processes: a per-key file lock around "look in
the cache, else fill", so a second caller waits and then finds the file. A fill writes a
temporary file that is renamed into place, so a reader never sees a partial file and a failed
fill leaves nothing behind. A key's lock file goes once its file is gone (evicted, or never
filled) and nobody holds it, so lock files do not pile up over the keys a node ever saw.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock, Timeout

CACHED_SUFFIX = ".safetensors"
PART_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
FOLDER_LOCK = ".cache.lock"


class OverBudget(Exception):
    """A filled file is larger than the whole cache; it was not kept."""

    def __init__(self, size_bytes: int):
        super().__init__(f"{size_bytes} bytes is over the cache budget")
        self.size_bytes = size_bytes


class DiskCache:
    """Files by key in one folder; thread- and process-safe. The counters are this process's;
    `stats` adds what the shared folder holds now."""

    def __init__(self, folder: str, budget_bytes: int, lock_wait_s: float, stale_part_s: float):
        self.root = Path(os.path.expanduser(folder)).resolve()
        self.budget_bytes = budget_bytes
        self.lock_wait_s = lock_wait_s
        # Fills end in rename or unlink; a part file older than this is a crashed fill's.
        self.stale_part_s = stale_part_s
        self._counter_lock = threading.Lock()
        self.downloads = self.hits = self.evictions = self.bytes_downloaded = 0
        # What the folder held at the last scan (files, bytes), and this process's reads then.
        self._folder: tuple[int, int] | None = None
        self._reads_at_scan = 0

    def fetch(self, key: str, fill: Callable[[BinaryIO], int]) -> bytes:
        """The bytes cached under `key` (a file-name-safe string); on a miss, `fill(out)` writes
        them into `out` and returns their size. Raises what `fill` raises, OverBudget for a
        file larger than the budget, and filelock.Timeout when another fill of the key held
        its lock over `lock_wait_s`."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{key}{CACHED_SUFFIX}"
        # Per key, so different keys fill in parallel. flock also excludes other threads of
        # this process: each FileLock object opens its own descriptor.
        with FileLock(self.root / f"{key}{LOCK_SUFFIX}", timeout=self.lock_wait_s):
            handle = self._open_cached(path)
            if handle is None:
                handle = self._fill(key, path, fill)
            else:
                self._count(hits=1)
        # Read outside the lock: an open file survives an eviction that unlinks it meanwhile.
        with handle:
            return handle.read()

    def stats(self) -> dict:
        """The counters, and what the folder holds as of this process's last read through the
        cache. A replica reports its stats after every request, and a scan costs a stat per
        file (9.6 ms for 1000 files beside their locks, timed once with a throwaway script): the
        folder is scanned again only once this process has read through the cache since, which
        a request for a hot adapter does not."""
        reads = self.downloads + self.hits
        if self._folder is None or reads != self._reads_at_scan:
            files = self._cached_files()
            self._folder = (len(files), sum(size for _, size, _ in files))
            self._reads_at_scan = reads
        cached_files, cached_bytes = self._folder
        return {
            "downloads": self.downloads,
            "hits": self.hits,
            "evictions": self.evictions,
            "bytes_downloaded": self.bytes_downloaded,
            "cached_files": cached_files,
            "cached_bytes": cached_bytes,
        }

    def _open_cached(self, path: Path) -> BinaryIO | None:
        with self._folder_lock():
            try:
                handle = path.open("rb")
            except FileNotFoundError:
                return None
            _touch(path)
            return handle

    def _fill(self, key: str, path: Path, fill: Callable[[BinaryIO], int]) -> BinaryIO:
        part = self.root / f"{key}.{uuid.uuid4().hex}{PART_SUFFIX}"
        try:
            with part.open("wb") as out:
                size = fill(out)
            if size > self.budget_bytes:
                raise OverBudget(size)
            with self._folder_lock():
                os.replace(part, path)
                _touch(path)
                handle = path.open("rb")
                evicted = self._evict_over_budget(keep=path)
                self._remove_stale_parts()
                self._remove_unused_locks()
        finally:
            part.unlink(missing_ok=True)
        self._count(downloads=1, bytes_downloaded=size, evictions=evicted)
        return handle

    def _evict_over_budget(self, keep: Path) -> int:
        """Drop least-recently-used files until the cache fits its budget; never `keep`."""
        files = self._cached_files()
        total = sum(size for _, size, _ in files)
        evicted = 0
        for file, size, _last_use in sorted(files, key=lambda f: (f[2], f[0].name)):
            if total <= self.budget_bytes:
                break
            if file == keep:
                continue
            file.unlink(missing_ok=True)
            total -= size
            evicted += 1
        return evicted

    def _remove_stale_parts(self) -> None:
        cutoff_ns = time.time_ns() - int(self.stale_part_s * 1e9)
        for part in self.root.glob(f"*{PART_SUFFIX}"):
            try:
                if part.stat().st_mtime_ns < cutoff_ns:
                    part.unlink()
            except FileNotFoundError:
                continue

    def _remove_unused_locks(self) -> None:
        """Delete the lock files of keys with no cached file that nobody holds. Each is taken
        before it is deleted: filelock notices a lock file deleted under a waiter (the inode
        it locked has no name) and opens the new one, so a fill waiting on it stays alone."""
        cached = {file.name for file in self.root.glob(f"*{CACHED_SUFFIX}")}
        for lock_path in self.root.glob(f"*{LOCK_SUFFIX}"):
            key = lock_path.name.removesuffix(LOCK_SUFFIX)
            if lock_path.name == FOLDER_LOCK or f"{key}{CACHED_SUFFIX}" in cached:
                continue
            try:
                with FileLock(lock_path, timeout=0):
                    lock_path.unlink(missing_ok=True)
            except Timeout:
                continue  # in use: a fill or a read of that key under way

    def _cached_files(self) -> list[tuple[Path, int, int]]:
        """(path, size, last use in ns) of every complete file in the cache."""
        files = []
        for file in self.root.glob(f"*{CACHED_SUFFIX}"):
            try:
                stat = file.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            files.append((file, stat.st_size, stat.st_mtime_ns))
        return files

    def _folder_lock(self) -> FileLock:
        # Guards the folder as a whole (insert, touch, evict) across the node's processes.
        return FileLock(self.root / FOLDER_LOCK, timeout=60)

    def _count(self, **increments: int) -> None:
        with self._counter_lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)


def _touch(path: Path) -> None:
    """Mark a file as used now; nanoseconds given explicitly, so close uses still order."""
    now_ns = time.time_ns()
    os.utime(path, ns=(now_ns, now_ns))
