"""The pipeline calls of one replica: a group of jobs with the active adapters set, stopped
early when every request in it went away, counted and timed for /models and the metrics.

Runs on the replica's tensor thread only (deployments/base.py), so its counters need no lock.
"""

from __future__ import annotations

import threading
import time

import torch

from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.batching import batched_pipeline_kwargs
from deployments.replica_health import ReplicaHealth
from deployments.replica_metrics import ReplicaMetrics
from deployments.schemas import GenerationJob


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

    def render(
        self,
        jobs: list[GenerationJob],
        active: list[ActiveAdapter],
        interrupted: threading.Event,
    ) -> tuple[list, float]:
        """One pipeline call for jobs of one batch key: each image from its own job's seed, and
        the call's ms. One job is called exactly as before batching existed (one prompt, one
        generator)."""
        self.health.before_render()  # never from a model that is not the one loaded
        self.adapters.activate(active)
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
            with torch.inference_mode():
                output = self.pipe(
                    **kwargs,
                    generator=generator,
                    output_type="pil",
                    callback_on_step_end=stop_if_interrupted,
                )
        finally:
            self.running -= 1
        elapsed_s = time.perf_counter() - started
        self.render_s += elapsed_s
        self.metrics.generation_s.observe(elapsed_s)
        media = output.frames if self.family.output == "video" else output.images
        return list(media[: len(jobs)]), elapsed_s * 1000.0
