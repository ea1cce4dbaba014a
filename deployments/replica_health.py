"""A model replica's health as Serve's periodic `check_health` asks it: is its pipeline still
the model it loaded?

The comparison is the base guard's (`base_guard.py`): module and parameter identities, shapes,
dtypes, the diffusers configs, and a few sampled values per parameter; 0.3 ms on the tiny Flux
model, about 4 ms with FLUX.1-dev's parameter count, on a CPU. It runs on the replica's tensor
thread, before each render and for each health check, between renders and loads, where no
adapter is half loaded; an adapter fused into base weights is compared by the base values it
keeps aside. A change found there was made
outside any load (a load undoes its own, or marks the pipeline broken itself), so nothing says
it can be undone: the replica renders nothing more and Serve replaces it.

Test-only fault injection, in the spirit of cluster/train/loop_config.py's CRASH_* variables:
with LORAPLEX_FAULT_CORRUPT_BASE_AFTER=N in a replica's environment, the replica overwrites a
base weight in place before its (N+1)th pipeline call, once per LORAPLEX_FAULT_MARKER file.
Nothing reaches it over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import Executor, Future

import torch

from deployments.adapters import PipelineAdapters
from deployments.errors import PipelineBroken

# How long `check` waits for the comparison before answering from the last one: well under
# Serve's health_check_timeout_s, which a render holding the tensor thread could outlast.
CHECK_WAIT_S = 1.0
CORRUPT_AFTER_ENV = "LORAPLEX_FAULT_CORRUPT_BASE_AFTER"
FAULT_MARKER_ENV = "LORAPLEX_FAULT_MARKER"


class ReplicaHealth:
    def __init__(self, adapters: PipelineAdapters, tensor_thread: Executor):
        """`tensor_thread`: the replica's one-thread executor for tensor work."""
        self._adapters = adapters
        self._tensor_thread = tensor_thread
        self._pending: Future | None = None
        self.last_check_ms: float | None = None
        self._renders = 0
        corrupt_after = os.environ.get(CORRUPT_AFTER_ENV)
        self._corrupt_after = int(corrupt_after) if corrupt_after else None

    def before_render(self) -> None:
        """On the tensor thread, before each pipeline call: PipelineBroken rather than render
        a model that is not the one loaded. The comparison runs here too, not only in Serve's
        periodic check: it costs a small part of any render (module docstring), and without
        it every request between a change and the next check got a wrong image as a 200."""
        self._renders += 1
        if self._corrupt_after is not None and self._renders == self._corrupt_after + 1:
            self._inject_corruption()
        if self._adapters.broken is None:
            self._compare()
        self._raise_if_broken()

    async def check(self) -> None:
        """PipelineBroken if the pipeline is not the model as loaded. A comparison behind a
        render is not waited for past CHECK_WAIT_S: the last finished one stands, and the
        next call reads the pending one (a video render can outlast Serve's timeout)."""
        if self._pending is None and self._adapters.broken is None:
            self._pending = self._tensor_thread.submit(self._compare)
        if self._pending is not None:
            await asyncio.wait([asyncio.wrap_future(self._pending)], timeout=CHECK_WAIT_S)
            if self._pending.done():
                done, self._pending = self._pending, None
                done.result()
        self._raise_if_broken()

    def _compare(self) -> None:
        started = time.perf_counter()
        adapters = self._adapters
        changes = adapters.guard.changes(adapters.activation.base_values())
        self.last_check_ms = (time.perf_counter() - started) * 1000.0
        if changes and adapters.broken is None:
            more = f" and {len(changes) - 1} more" if len(changes) > 1 else ""
            adapters.broken = f"the base model changed outside any load: {changes[0]}{more}"

    def _raise_if_broken(self) -> None:
        if self._adapters.broken is not None:
            raise PipelineBroken(
                f"this replica's pipeline is not the model it loaded ({self._adapters.broken}); "
                "Serve is replacing the replica: retry shortly"
            )

    def _inject_corruption(self) -> None:
        marker = os.environ.get(FAULT_MARKER_ENV)
        if marker:
            try:  # once per marker: the replacement replica serves soundly
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        denoiser = getattr(self._adapters.pipe, self._adapters.family.denoiser_component)
        weight = next(p for n, p in denoiser.named_parameters() if "lora_" not in n)
        with torch.no_grad():
            weight.add_(1.0)
