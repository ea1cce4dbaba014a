"""DiffusionDeployment: the one Serve deployment class that serves every family.

Each replica loads its family's pipeline once and keeps an LRU of hot adapters through
`@serve.multiplexed` (hot_adapters.py), so Serve routes a request to a replica that already
holds its first adapter; its metrics are declared in replica_metrics.py. The pipeline is
stateful (which adapters are active, at what scale), so everything that touches it runs under
one lock: adapter loads, evictions and generations never overlap, and an eviction therefore
always waits for the generation in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from deployments.adapters import ActiveAdapter, PipelineAdapters, PreparedAdapter
from deployments.batching import GroupRenders, batch_key
from deployments.compiled import CompiledGeneration, compile_report
from deployments.config import LoraRootCacheConfig, ModelConfig, RemoteLoraConfig
from deployments.family import get_family
from deployments.hot_adapters import HotAdapters
from deployments.job_sizes import block_field, resolve_sizes
from deployments.loading import load_pipeline
from deployments.loras.merge import MergeInput, merge_stack
from deployments.loras.remote import RemoteLoraCache
from deployments.loras.root_cache import RootCache
from deployments.loras.store import LoraStore
from deployments.media import encode_image, encode_video
from deployments.rendering import Renderer
from deployments.replica_health import ReplicaHealth
from deployments.replica_metrics import ReplicaMetrics, gpu_share, resident_memory_mb
from deployments.replica_placement import replica_placement
from deployments.replica_reports import RegistryReports
from deployments.schemas import AdapterUse, GenerationJob, GenerationResult, LoraRef
from deployments.warm_start import begin_warm_start


class DiffusionDeployment:
    def __init__(
        self,
        model: dict | ModelConfig,
        lora_root: str,
        remote_loras: dict | None = None,
        lora_root_cache: dict | None = None,
        registry_for: Callable[[str], Any] | None = None,
    ):
        """`registry_for(app_name)` creates or finds the app's registry actor (the app builder
        passes serve.registry's; without it the replica finds the registry by name)."""
        self.model = ModelConfig.model_validate(model)
        self.family = get_family(self.model.family)
        # One thread runs all of this replica's tensor work: the pipeline's load, adapter
        # loads, generations. torch's CPU kernels use GNU OpenMP, which gives each calling
        # thread its own team of worker threads; once the teams outnumber the cores, every
        # team stops spinning between parallel regions and sleeps, so each region pays a
        # wake-up: a generation from a second thread took 1.245x the main thread's on 2
        # cores (`python -m loadtest.torch_threads`). Reading and checking files stays beside it
        # (`_read_adapter`): a known layout touches no tensor, and LoRA matrices are below
        # torch's size for a parallel copy on a CPU replica.
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-torch")
        self.pipe, self.adapters = self._torch.submit(self._load_pipeline).result()
        self.health = ReplicaHealth(self.adapters, self._torch)
        self.store = LoraStore(lora_root)
        self.root_cache = RootCache(
            self.store, LoraRootCacheConfig.model_validate(lora_root_cache or {})
        )
        self.remote = RemoteLoraCache(RemoteLoraConfig.model_validate(remote_loras or {}))
        self._lock = asyncio.Lock()
        self._batches_run = self._requests_batched = 0
        self._group_renders = GroupRenders()

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._reports = RegistryReports(context.app_name, self.describe, registry_for)
        self._gpu_share = gpu_share()
        self._placement = replica_placement(str(self.pipe.device))

        if self.model.max_batch_size > 1:
            # Wrapped here, per replica, with this model's limits. Serve splits a batch by
            # multiplexed model id (a stack's first adapter); `_render_batch` groups further.
            self._render_batched = serve.batch(
                max_batch_size=self.model.max_batch_size,
                batch_wait_timeout_s=self.model.batch_wait_timeout_ms / 1000.0,
            )(self._render_batch)

        self.metrics = ReplicaMetrics()
        self.renderer = Renderer(self.pipe, self.family, self.adapters, self.health, self.metrics)
        self.compiled = None
        if self.model.compile.enabled:  # compiled and warmed up before Serve calls it ready
            self.compiled = CompiledGeneration(self.model, self.renderer)
            self._torch.submit(self.compiled.start).result()
        self.hot = HotAdapters(
            self.adapters,
            self.model.max_adapters_per_replica,
            self._read_adapter,
            self._in_torch_thread,
            self._in_torch_thread_now,
            self.metrics,
            self._reports.report,
        )
        self._reports.report()
        self._warm_start = begin_warm_start(  # its deployment's recent adapters, beside serving
            self.model.name, self.hot, self._lock, self._reports, self.store.resolve
        )

    def _load_pipeline(self) -> tuple[object, PipelineAdapters]:
        self._torch_thread = threading.get_ident()
        pipe = load_pipeline(
            self.model.family, self.model.model_uri, self.model.dtype, self.model.device
        )
        adapters = PipelineAdapters(
            pipe,
            self.family,
            self.model.fuse_single_adapter,
            max_adapters=self.model.max_adapters_per_replica,
        )
        return pipe, adapters

    async def _in_torch_thread(self, work, *args):
        """`work(*args)` on the replica's tensor thread (see `__init__`)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._torch, functools.partial(work, *args)
        )

    def _in_torch_thread_now(self, work, *args):
        """`work(*args)` on the tensor thread, from a plain thread (Serve's executor runs an
        evicted adapter's `__del__`), or directly when already on it."""
        if threading.get_ident() == self._torch_thread:
            return work(*args)
        return self._torch.submit(work, *args).result()

    async def generate(self, job: GenerationJob) -> GenerationResult:
        job = resolve_sizes(job, self.family, self.pipe, self.model, self.adapters)
        async with contextlib.AsyncExitStack() as held:
            # Read and parse cold files before taking the lock, so I/O overlaps other
            # generations; held while this request is served, so requests for the same cold
            # file meanwhile share its one read and its one parsed copy.
            staged = {
                use.key: await held.enter_async_context(self.hot.hold_read(use))
                for use in job.adapters
                if use.key not in self.hot
            }
            image, inference_ms, cache = await self._generate_staged(job, staged)
        content = await asyncio.to_thread(self._encode, image, job)
        gpu_seconds = inference_ms / 1000.0 * self._gpu_share
        cost_usd = gpu_seconds * self.model.price_per_gpu_hour / 3600.0
        # Ray's counters refuse an increment of 0 (a free model, price_per_gpu_hour 0).
        if gpu_seconds > 0:
            self.metrics.gpu_s.inc(gpu_seconds)
        if cost_usd > 0:
            self.metrics.cost.inc(cost_usd)
        return GenerationResult(
            content=content,
            media_type=self.family.media_type,
            inference_ms=inference_ms,
            gpu_seconds=gpu_seconds,
            cost_usd=cost_usd,
            lora_cache=cache,
            replica_id=self.replica_id,
        )

    async def _generate_staged(self, job: GenerationJob, staged: dict):
        if self.model.max_batch_size > 1:
            return await self._generate_batched(job, staged)
        # Shielded: when Serve cancels a request (its client went away), the pipeline work
        # already under way must finish before the lock is released, or the next request would
        # change adapters under a generation still running in its thread. The interrupt makes
        # the pipeline skip its remaining steps, so the abandoned work ends soon.
        interrupted = threading.Event()
        work = asyncio.ensure_future(self._generate_locked(job, staged, interrupted))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            interrupted.set()
            raise

    async def _generate_locked(
        self, job: GenerationJob, staged: dict, interrupted: threading.Event
    ):
        async with self._lock:
            if interrupted.is_set():
                raise asyncio.CancelledError
            cache = await self.hot.ensure_hot(job.adapters, staged)
            active = self._active_for(job)
            [image], inference_ms = await self._in_torch_thread(
                self.renderer.render, [job], active, interrupted
            )
        if interrupted.is_set():
            self._reports.report()  # renders_interrupted, for /models
        return image, inference_ms, cache

    async def _generate_batched(self, job: GenerationJob, staged: dict):
        """The request's adapters made hot, on its own (a file that fails to load fails this
        request alone, before it joins a batch), then its image from a batch."""

        async def ensure_hot() -> list[str]:
            async with self._lock:
                return await self.hot.ensure_hot(job.adapters, staged)

        # Shielded as in the unbatched path: a load under way finishes before the lock is free.
        cache = await asyncio.shield(asyncio.ensure_future(ensure_hot()))
        try:
            outcome = await self._render_batched(job)
        except asyncio.CancelledError:
            self._group_renders.abandon(job)
            raise
        if isinstance(outcome, BaseException):  # this request's group failed, not the batch
            raise outcome
        image, inference_ms = outcome
        return image, inference_ms, cache

    async def _render_batch(self, jobs: list[GenerationJob]) -> list:
        """Serve's batch handler: one pipeline call per group of jobs with the same
        `batch_key`, each job's (image, its share of the call's ms), or the exception that
        failed its group. Serve runs it in its own task, so a request that goes away does not
        cancel the call its batch shares."""
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            key = batch_key(job)
            groups.setdefault(("alone", index) if key is None else key, []).append(index)
        outcomes: list = [None] * len(jobs)
        grouped = [[jobs[index] for index in indexes] for indexes in groups.values()]
        events = self._group_renders.start(grouped)
        try:
            for indexes, group, interrupted in zip(groups.values(), grouped, events, strict=True):
                if interrupted.is_set():  # all its requests went while an earlier group rendered
                    self.renderer.interrupted += 1
                    for index in indexes:
                        outcomes[index] = asyncio.CancelledError()
                    continue
                try:
                    media, elapsed_ms = await self._render_group(group, interrupted)
                except Exception as e:  # noqa: BLE001 - handed to each request of the group
                    for index in indexes:
                        outcomes[index] = e
                    continue
                # A call its requests all left rendered for no one: it counts as interrupted
                # (in the render), not as a batch run. Counting it as both let a heartbeat
                # report show the one count before the other.
                if len(group) > 1 and not interrupted.is_set():
                    self._batches_run += 1
                    self._requests_batched += len(group)
                # Each request is billed its share of the call: the shares add up to its time.
                for index, image in zip(indexes, media, strict=True):
                    outcomes[index] = (image, elapsed_ms / len(group))
        finally:
            self._group_renders.finish(jobs)
        self._reports.report()  # the batch counters, for /models
        return outcomes

    async def _render_group(self, jobs: list[GenerationJob], interrupted: threading.Event):
        async with self._lock:
            # Each request made its stack hot before it joined the batch, but a request for
            # another stack may have evicted one of those adapters while this batch formed.
            # Touched again (reloaded if it went) under the lock, which every eviction needs:
            # from here to the end of the call no adapter of the group can go.
            await self.hot.ensure_hot(jobs[0].adapters, {}, count=False)
            active = self._active_for(jobs[0])
            return await self._in_torch_thread(self.renderer.render, jobs, active, interrupted)

    def _active_for(self, job: GenerationJob) -> list[ActiveAdapter]:
        """The job's stack as the pipeline activates it (its adapters must be hot)."""
        return [
            ActiveAdapter(
                self.hot.get(use.key),
                use.strength,
                use.clip_strength,
                self.adapters.block_scales(use.block_weights, block_field(index)),
            )
            for index, use in enumerate(job.adapters)
        ]

    async def check_lora(self, data: bytes, name: str) -> int:
        """How many of a file's LoRA matrices fit this model; LoraIncompatible when too few.
        Changes nothing: the ingress calls it on an upload before publishing the file."""

        def check() -> int:
            # As a request would read it, so an upload is refused for what a request would be.
            tensors = self.adapters.file_tensors(PreparedAdapter(name, data))
            return self.adapters.check(tensors, name)

        # Beside the generation in flight, as a request's cold file is checked (`_read_adapter`):
        # on the tensor thread an upload waited for the whole render in flight.
        return await asyncio.to_thread(check)

    async def merge_loras(self, inputs: list[tuple[str, float]], trigger_words: list[str]) -> bytes:
        """One `.safetensors` file that applies the stack of `inputs` (store key, ratio) at
        strength 1 (deployments/loras/merge.py), read beside the generation in flight and
        merged under the lock on the tensor thread."""
        uses = [
            AdapterUse(ref=LoraRef.parse(key), strength=ratio, clip_strength=ratio)
            for key, ratio in inputs
        ]
        prepared = {use.key: await self.hot.read_shared(use) for use in uses}
        async with self._lock:
            stack = [
                MergeInput(
                    use.key, use.name, use.strength, self.hot.get(use.key), prepared[use.key]
                )
                for use in uses
            ]
            return await self._in_torch_thread(merge_stack, self.adapters, stack, trigger_words)

    def describe(self) -> dict:
        """This replica's state, as /models shows it."""
        return {
            "deployment": self.model.name,
            "replica_id": self.replica_id,
            **self._placement,  # node, GPU share and ids, device
            "hot_adapters": [LoraRef.parse(key).name for key in self.hot.keys()],
            "max_adapters_per_replica": self.model.max_adapters_per_replica,
            "adapter_loads": self.hot.loads,
            # Loads that built new layers; the others refilled the layers of an evicted adapter.
            "adapter_fresh_loads": self.adapters.fresh_loads,
            "free_adapter_slots": self.adapters.free_slot_count(),
            "adapter_hits": self.hot.hits,
            "adapter_evictions": self.hot.evictions,
            # Cold files read, and requests that shared a read another request made.
            "adapter_file_reads": self.hot.reads_started,
            "adapter_file_reads_shared": self.hot.reads_joined,
            "max_batch_size": self.model.max_batch_size,
            "batches_run": self._batches_run,
            "requests_batched": self._requests_batched,
            "renders_interrupted": self.renderer.interrupted,
            "renders_running": self.renderer.running,
            # Layer changes made off the tensor thread: always 0 (a test holds it there).
            "tensor_calls_off_thread": self.adapters.calls_off_thread,
            "render_s": round(self.renderer.render_s, 3),
            "remote_lora_cache": self.remote.stats() if self.remote.config.enabled else None,
            "lora_root_cache": self.root_cache.stats(),
            "rss_mb": round(resident_memory_mb(), 1),
            **compile_report(self.compiled, self.renderer),  # compiled, warmup_ms, recompiles
        }

    async def check_health(self) -> None:
        # Serve calls this every health_check_period_s; a report beside the 1 s heartbeat is cheap.
        self._reports.report()
        await self.health.check()  # the pipeline as loaded, or Serve replaces this replica

    def __del__(self):
        executor = getattr(self, "_torch", None)
        if executor is not None:
            executor.shutdown(wait=False)
        reports = getattr(self, "_reports", None)
        if reports is not None:
            reports.remove(self.replica_id)

    def _read_adapter(self, use: AdapterUse) -> PreparedAdapter:
        ref = use.ref
        if use.url is not None:  # through the node's disk cache, checked again against config
            data = self.remote.fetch(use.url)
        else:
            data = self.root_cache.read_bytes(ref)
        return self.adapters.prepare(data, ref.name)

    def _encode(self, media, job: GenerationJob) -> bytes:
        if self.family.output == "video":
            return encode_video(list(media), self.family.media_type, job.fps)
        return encode_image(media, self.family.media_type)
