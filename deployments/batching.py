"""Which requests may share one pipeline call, and the call's arguments for them.

With a model's `max_batch_size` above 1, the replica collects requests (`@serve.batch`) and
renders those with equal `batch_key` in one pipeline call: a list of prompts and one seeded
generator per image, so each image starts from its own request's noise. Only the prompt and the
seed vary inside a call; everything else shapes the call itself and must be equal.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from deployments.schemas import GenerationJob

# Pipeline arguments that diffusers pipelines take per image, as a list with one entry per
# prompt. Every other argument is one value for the whole call.
PER_IMAGE_KWARGS = ("prompt", "negative_prompt")


def batch_key(job: GenerationJob) -> tuple | None:
    """Jobs with equal keys render together; None: this job is rendered alone."""
    if job.image is not None:
        # An edit's input image is per request, and the edit pipelines size and encode their
        # input images per call: not batched.
        return None
    return (
        # The adapters are activated on the model, not per image: one stack, at one set of
        # strengths and block weights, per call.
        tuple(
            (
                use.key,
                use.strength,
                use.clip_strength,
                json.dumps(use.block_weights, sort_keys=True),
            )
            for use in job.adapters
        ),
        # One latent tensor per call: every image the same size (and, for video, length).
        job.width,
        job.height,
        job.length,
        # One denoising loop per call.
        job.steps,
        # One guidance scale per call.
        job.cfg,
        # Flux and SDXL run true classifier-free guidance, or leave the negative branch out,
        # according to whether a negative prompt is given: all of a call's images or none.
        bool(job.negative_prompt),
    )


def batched_pipeline_kwargs(per_job: list[dict[str, Any]]) -> dict[str, Any]:
    """One pipeline call's arguments for jobs of one batch key: the per-image arguments as
    lists, in job order, the others shared. ValueError if a shared argument differs (a batch
    key that misses a field)."""
    first = per_job[0]
    for kwargs in per_job[1:]:
        shared = {k for k in first if k not in PER_IMAGE_KWARGS}
        if kwargs.keys() != first.keys() or any(kwargs[k] != first[k] for k in shared):
            raise ValueError("jobs of one batch differ in more than their prompts")
    merged = dict(first)
    for name in PER_IMAGE_KWARGS:
        if name in first:
            merged[name] = [kwargs[name] for kwargs in per_job]
    return merged


class GroupRenders:
    """The groups a running batch renders, and which of their requests still wait for them.
    A group's `interrupted` event is set once every request in it has gone away (its client
    disconnected and Serve cancelled it), so the replica stops rendering images nobody will
    receive: the pipeline skips its remaining steps. Serve's batching drops requests cancelled
    before a batch starts, but not those cancelled while it renders."""

    def __init__(self) -> None:
        # id of a waiting job -> (ids of its group's jobs still waiting, the group's event)
        self._by_job: dict[int, tuple[set[int], threading.Event]] = {}

    def start(self, groups: list[list[GenerationJob]]) -> list[threading.Event]:
        """Each group's interrupt event, its jobs registered as waiting."""
        events = []
        for group in groups:
            waiting, interrupted = {id(job) for job in group}, threading.Event()
            for job in group:
                self._by_job[id(job)] = (waiting, interrupted)
            events.append(interrupted)
        return events

    def abandon(self, job: GenerationJob) -> None:
        """The job's request went away; its group is interrupted if it was the last."""
        entry = self._by_job.pop(id(job), None)
        if entry is not None:
            waiting, interrupted = entry
            waiting.discard(id(job))
            if not waiting:
                interrupted.set()

    def finish(self, jobs: list[GenerationJob]) -> None:
        for job in jobs:
            self._by_job.pop(id(job), None)
