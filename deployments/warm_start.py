"""A replica's warm start: once its pipeline is up, it loads the adapters its deployment's
replicas held most recently, which the app's registry keeps after those replicas are gone
(serve/registry.py). A replica that replaces one lost with its node then answers its
predecessor's adapters hot, and a replica added by scaling up starts with the hot set.

Best effort, and beside serving rather than before it: the replica is ready as soon as its
pipeline is, and each load takes the replica's lock as a request's load would, so a request
waits at most for the one load in progress. A name the LoRA root no longer holds, or a file
that no longer loads, is skipped (a request for it gets the usual error); past `BUDGET_S` the
rest is left to the requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from deployments.hot_adapters import HotAdapters
from deployments.replica_reports import RegistryReports
from deployments.schemas import AdapterUse, LoraRef

logger = logging.getLogger("ray.serve")

# Long enough for a registry restart (serve/registry.py): the wait is beside serving.
REGISTRY_TIMEOUT_S = 15.0
BUDGET_S = 120.0


def begin_warm_start(
    deployment: str,
    hot: HotAdapters,
    lock: asyncio.Lock,
    reports: RegistryReports,
    resolve: Callable[[str], LoraRef],
) -> asyncio.Task | None:
    """`warm_start` as a task on the replica's event loop (Serve runs a replica's constructor
    on it); None for a replica built outside one (a script, a unit test)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.create_task(warm_start(deployment, hot, lock, reports, resolve))


async def warm_start(
    deployment: str,
    hot: HotAdapters,
    lock: asyncio.Lock,
    reports: RegistryReports,
    resolve: Callable[[str], LoraRef],
    budget_s: float = BUDGET_S,
) -> list[str]:
    """Load `deployment`'s recent adapters, the oldest first (so the newest is the last the
    LRU would evict), each at its current version (`resolve`: a name to its file version).
    The names loaded."""
    try:
        names = await reports.recent_adapters(deployment, REGISTRY_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - no registry answer: start cold, as before
        logger.warning("warm start of %s: no recent adapters from the registry: %r", deployment, e)
        return []
    deadline = time.monotonic() + budget_s
    loaded = []
    for name in names:
        if time.monotonic() > deadline:
            logger.warning("warm start of %s: %.0f s budget spent", deployment, budget_s)
            break
        try:
            if await _load(name, hot, lock, resolve):
                loaded.append(name)
        except Exception as e:  # noqa: BLE001 - best effort: a request for it says what is wrong
            logger.warning("warm start of %s: %s not loaded: %r", deployment, name, e)
    if names:
        logger.info("warm start of %s: %d of %d loaded", deployment, len(loaded), len(names))
    return loaded


async def _load(name: str, hot: HotAdapters, lock: asyncio.Lock, resolve) -> bool:
    ref = await asyncio.to_thread(resolve, name)
    use = AdapterUse(ref=ref, strength=1.0, clip_strength=1.0)
    if use.key in hot:  # a request loaded it meanwhile
        return False
    # Read and checked before the lock, as a request's cold file is (base.py, `generate`).
    async with hot.hold_read(use) as prepared, lock:
        await hot.ensure_hot([use], {use.key: prepared}, count=False)
    return True
