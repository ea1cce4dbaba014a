"""The pipeline calls of one replica: a group of jobs with the active adapters set, stopped
early when every request in it went away, counted and timed for /models and the metrics.

Runs on the replica's tensor thread only (deployments/base.py), so its counters need no lock.
A compiled model's render whose stack cannot be fused runs eagerly (deployments/compiled.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch

from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.batching import batched_pipeline_kwargs
from deployments.replica_health import ReplicaHealth
from deployments.replica_metrics import ReplicaMetrics
from deployments.schemas import GenerationJob

logger = logging.getLogger("ray.serve")
MAX_FALLBACKS_LOGGED = 1024  # adapters whose eager fallback was logged, before starting over


class Renderer:
    def __init__(
        self,
        pipe,
        family,
        adapters: PipelineAdapters,
        health: ReplicaHealth,
        metrics: ReplicaMetrics,
    ):
        self.pipe = pipe
        self.family = family
        self.adapters = adapters
        self.health = health
        self.metrics = metrics
        # Pipeline calls stopped before their last step (every request in them had gone away),
        # and those under way now.
        self.interrupted = 0
        self.running = 0
        # Seconds spent in pipeline calls: the replica's busy time (its GPU's, on a GPU).
        self.render_s = 0.0
        # The compiled denoiser (a CompiledGeneration, which sets itself here), or None; the
        # renders it ran eagerly, and the adapters already logged for it.
        self.compiled = None
        self.eager_fallbacks = 0
        self._fallbacks_logged: set[str] = set()

    def render(
        self,
        jobs: list[GenerationJob],
        active: list[ActiveAdapter],
        interrupted: threading.Event,
        count: bool = True,
    ) -> tuple[list, float]:
        """One pipeline call for jobs of one batch key: each image from its own job's seed, and
        the call's ms. One job is called exactly as before batching existed (one prompt, one
        generator). `count`: False for a call no request made (the compile's warm-up)."""
        self.health.before_render()  # never from a model that is not the one loaded
        self.adapters.activate(active)
        eager = self._eager_fallback(jobs[0], active)
        generators = [torch.Generator(device="cpu").manual_seed(job.seed) for job in jobs]
        if len(jobs) == 1:
            kwargs = self.family.pipeline_kwargs(jobs[0])
            generator = generators[0]
        else:
            kwargs = batched_pipeline_kwargs([self.family.pipeline_kwargs(job) for job in jobs])
            generator = generators

        def stop_if_interrupted(pipe, step, timestep, callback_kwargs):
            if interrupted.is_set() and not pipe._interrupt:
                pipe._interrupt = True  # diffusers skips the remaining steps
                self.interrupted += 1
            return callback_kwargs

        started = time.perf_counter()
        self.running += 1
        try:
            stance = torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
            with torch.inference_mode(), stance:
                output = self.pipe(
                    **kwargs,
                    generator=generator,
                    output_type="pil",
                    callback_on_step_end=stop_if_interrupted,
                )
        finally:
            self.running -= 1
        elapsed_s = time.perf_counter() - started
        if self.compiled is not None and not eager:
            self.compiled.rendered()
        if count:
            self.render_s += elapsed_s
            self.metrics.generation_s.observe(elapsed_s)
        media = output.frames if self.family.output == "video" else output.images
        return list(media[: len(jobs)]), elapsed_s * 1000.0

    def _eager_fallback(self, job: GenerationJob, active: list[ActiveAdapter]) -> bool:
        """Whether a compiled model renders this stack eagerly (a layer its fusion refuses:
        DoRA, a LoRA bias); counted, and logged once per adapter with the reason."""
        reason = self.adapters.activation.eager_reason
        if self.compiled is None or reason is None:
            return False
        adapter_name, why = reason
        index = [a.adapter_name for a in active].index(adapter_name)
        label = job.adapters[index].name if index < len(job.adapters) else adapter_name
        self.eager_fallbacks += 1
        self.metrics.eager_fallbacks.inc()
        if label not in self._fallbacks_logged:
            if len(self._fallbacks_logged) >= MAX_FALLBACKS_LOGGED:
                self._fallbacks_logged.clear()
            self._fallbacks_logged.add(label)
            logger.warning(
                "LoRA %s renders eagerly, not compiled: it cannot be fused (%s)", label, why
            )
        return True
