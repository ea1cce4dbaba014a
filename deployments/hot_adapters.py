"""A replica's hot adapters: Serve's multiplexed LRU of file versions, the cold files staged
for its loader, and evictions.

Serve's multiplexed loader takes only a model id, so a request stages its prepared file here
before asking Serve for the adapter; Serve calls the loader on a miss and an evicted adapter's
`__del__` when the LRU is full. Both run under the replica's lock (held by `ensure_hot`'s
caller), so no generation is in flight while layers are loaded, released or deleted.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

from ray import serve

from deployments.adapters import PipelineAdapters, PreparedAdapter
from deployments.replica_metrics import ReplicaMetrics
from deployments.schemas import AdapterUse
from deployments.shared_reads import SharedReads


class _LruEntry:
    """What the multiplexed LRU holds for one adapter. Serve calls `__del__` on eviction."""

    def __init__(self, key: str, adapter_name: str, evict):
        self.key = key
        self.adapter_name = adapter_name
        self._evict = evict

    def __del__(self):
        # Serve calls this on eviction and Python again on garbage collection: act once.
        evict, self._evict = self._evict, None
        if evict is not None:
            evict(self)


class HotAdapters:
    def __init__(
        self,
        adapters: PipelineAdapters,
        max_adapters: int,
        read: Callable[[AdapterUse], PreparedAdapter],
        on_tensor_thread: Callable[..., Awaitable],
        on_tensor_thread_now: Callable,
        metrics: ReplicaMetrics,
        on_change: Callable[[], None],
    ):
        """`read` reads and prepares a cold file (beside the tensor thread); the two runners
        run tensor work on the replica's tensor thread, awaited or from a plain thread;
        `on_change` reports the replica's state."""
        self._adapters = adapters
        self._read = read
        self._on_tensor_thread = on_tensor_thread
        self._on_tensor_thread_now = on_tensor_thread_now
        self._metrics = metrics
        self._on_change = on_change
        self._names: dict[str, str] = {}  # store key -> peft adapter name, in load order
        self._staged: dict[str, PreparedAdapter] = {}
        self.loads = self.hits = self.evictions = 0
        # Cold files read once however many requests want them at a time (shared_reads.py).
        self._reads: SharedReads[PreparedAdapter] = SharedReads(
            on_start=metrics.file_reads.inc, on_join=metrics.file_reads_shared.inc
        )

        async def load_adapter(key: str) -> _LruEntry:
            return await self._load(key)

        self._get = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter)

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def get(self, key: str) -> str | None:
        """The peft adapter name of a hot file version, or None."""
        return self._names.get(key)

    def keys(self) -> list[str]:
        return list(self._names)

    @property
    def reads_started(self) -> int:
        return self._reads.started

    @property
    def reads_joined(self) -> int:
        return self._reads.joined

    async def ensure_hot(
        self, uses: list[AdapterUse], staged: dict, count: bool = True
    ) -> list[str]:
        """Load each adapter of the stack unless hot; 'hit' or 'miss' per adapter, in order.
        `count=False`: a batch touching its adapters again, not a request (no hit counted).
        The caller holds the replica's lock."""
        cache = []
        for use in uses:
            hit = use.key in self._names
            if not hit and use.key not in staged:
                staged[use.key] = await self.read_shared(use)
            self._staged = staged
            try:
                await self._get(use.key)
            finally:
                self._staged = {}
            cache.append("hit" if hit else "miss")
            if count:
                (self._metrics.hits if hit else self._metrics.misses).inc()
                self.hits += hit
        if uses:
            self._on_change()
        return cache

    def hold_read(self, use: AdapterUse):
        """The adapter's file, read and prepared (or joined to a read under way or held), held
        while the `async with` block runs."""
        return self._reads.hold(use.key, functools.partial(self._read, use))

    async def read_shared(self, use: AdapterUse) -> PreparedAdapter:
        """The adapter's file as `hold_read` gives it, for a caller that keeps it itself."""
        async with self.hold_read(use) as prepared:
            return prepared

    async def _load(self, key: str) -> _LruEntry:
        """The multiplexed loader: runs under the replica's lock, held by `ensure_hot`'s
        caller."""
        prepared = self._staged.pop(key)
        started = time.perf_counter()
        fresh_loads = self._adapters.fresh_loads  # only loads under the lock change it
        # Into an evicted adapter's layers when they fit (a free slot), else a fresh load.
        adapter_name, _ = await self._on_tensor_thread(self._adapters.load_prepared, prepared)
        self._metrics.load_s.observe(time.perf_counter() - started)
        if self._adapters.fresh_loads > fresh_loads:
            self._metrics.fresh_loads.inc()
        self._metrics.free_slots.set(self._adapters.free_slot_count())
        self._names[key] = adapter_name
        self.loads += 1
        self._on_change()
        return _LruEntry(key, adapter_name, self._evict)

    def _evict(self, adapter: _LruEntry) -> None:
        # Serve evicts only inside `_get`, which runs under the lock: no generation is in
        # flight while the adapter's layers are deleted or kept as a free slot. Serve calls
        # `__del__` in its default executor, and the release touches tensors, so it runs on
        # the tensor thread, which the lock keeps idle meanwhile.
        self._on_tensor_thread_now(self._adapters.release, adapter.adapter_name)
        self._names.pop(adapter.key, None)
        self.evictions += 1
        self._metrics.evictions.inc()
        self._metrics.free_slots.set(self._adapters.free_slot_count())
        self._on_change()
