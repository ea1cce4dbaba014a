"""A replica's reads of LoRA root files, through the node's disk cache where a read is costly.

On an object store every read of an adapter is a download: without a cache, an adapter evicted
from a replica's hot set and asked for again is fetched whole once more, and each replica of a
node fetches it for itself. This cache keeps the node's copy of each file version
(disk_cache.py: one download per version at a time across the node's replicas, a byte budget,
least recently used dropped first).

A copy is named by the root, the file's name and the version the ingress resolved, so a file
overwritten in the store is fetched again under its new version. A file overwritten between the
ingress's resolve and this read is cached under the older version, which no later request names.
"""

from __future__ import annotations

import hashlib

from filelock import Timeout

from deployments.config import LoraRootCacheConfig
from deployments.loras.disk_cache import DiskCache, OverBudget
from deployments.loras.store import LoraStore
from deployments.schemas import LoraRef

# How long a replica waits for another process's download of the same file before reading it
# itself: far beyond a multi-gigabyte file at object-store speeds.
LOCK_WAIT_S = 600.0


class RootCache:
    def __init__(self, store: LoraStore, config: LoraRootCacheConfig):
        self.store = store
        enabled = config.mode == "always" or (config.mode == "auto" and not store.is_local)
        self.cache = (
            DiskCache(
                config.cache_dir,
                config.cache_budget_bytes,
                lock_wait_s=LOCK_WAIT_S,
                stale_part_s=2 * LOCK_WAIT_S + 60,
            )
            if enabled
            else None
        )

    def read_bytes(self, ref: LoraRef) -> bytes:
        """The file's bytes, from the node's copy when the cache is on and holds it. Raises
        LoraNotFound as the store does."""
        if self.cache is None:
            return self.store.read_bytes(ref)
        try:
            return self.cache.fetch(self._key(ref), lambda out: self.store.copy_to(ref, out))
        except (OverBudget, Timeout):
            # A file larger than the whole cache, or another process's download of it stuck:
            # read as with no cache.
            return self.store.read_bytes(ref)

    def stats(self) -> dict | None:
        """The cache's counters and contents (disk_cache.DiskCache.stats); None when off."""
        return None if self.cache is None else self.cache.stats()

    def _key(self, ref: LoraRef) -> str:
        # The root is part of the key: apps with different roots may share a node's folder.
        identity = f"{self.store.root_uri}\0{ref.name}\0{ref.version}"
        return hashlib.sha256(identity.encode()).hexdigest()
