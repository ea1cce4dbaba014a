"""SharedReads: one read of a cold adapter file per replica, shared by the requests that want it.

A replica reads and parses a cold adapter's file before queueing for the pipeline lock, so the
read overlaps other generations. Requests for an adapter that is not hot yet each did that read
for themselves: a burst for a newly published LoRA read the file once per request and held one
parsed copy per request until its turn (a few hundred MB each for a real model's LoRA); a
one-minute Locust run on Flux read 309 files for 270 loads. Here the first request for a key
starts the read and later ones join it. The entry lives while any request holds it (the replica
holds it until the request is served), so a request that arrives while the first waits for the
lock joins too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    read: asyncio.Future[T]
    holders: int = 0


class SharedReads(Generic[T]):
    """Reads keyed by adapter key (name@version, so a new file version is a new read). Used on
    one event loop (the replica's); the read itself runs in a worker thread. `on_start` and
    `on_join`, if given, are called as `started` and `joined` count up (the replica's metrics)."""

    def __init__(
        self,
        on_start: Callable[[], object] | None = None,
        on_join: Callable[[], object] | None = None,
    ) -> None:
        self._entries: dict[str, _Entry[T]] = {}
        self.started = 0  # reads run
        self.joined = 0  # holds served by a read another request started
        self._on_start, self._on_join = on_start, on_join

    @contextlib.asynccontextmanager
    async def hold(self, key: str, read: Callable[[], T]) -> AsyncIterator[T]:
        """The result of `read()` for `key`, held until the block ends: from the read under
        way or held by another request if there is one, else from a new read in a worker
        thread. A failed read fails every request that joined it and is not kept: the next
        hold reads again."""
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(asyncio.ensure_future(asyncio.to_thread(read)))
            entry.read.add_done_callback(functools.partial(self._forget_if_failed, key, entry))
            self._entries[key] = entry
            self.started += 1
            if self._on_start is not None:
                self._on_start()
        else:
            self.joined += 1
            if self._on_join is not None:
                self._on_join()
        entry.holders += 1
        try:
            # Shielded: a request that goes away leaves the read to the others holding it.
            yield await asyncio.shield(entry.read)
        finally:
            entry.holders -= 1
            if entry.holders == 0 and self._entries.get(key) is entry:
                del self._entries[key]

    def held(self) -> int:
        """Files read or being read that some request still holds."""
        return len(self._entries)

    def _forget_if_failed(self, key: str, entry: _Entry[T], read: asyncio.Future) -> None:
        if read.cancelled() or read.exception() is not None:  # also marks the error retrieved
            if self._entries.get(key) is entry:
                del self._entries[key]
