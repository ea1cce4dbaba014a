"""The bench's image: one prompt at the run's size and steps, made as a replica's `_render`
makes it, and the bench's log line."""

from __future__ import annotations

import sys
import time

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def job_kwargs(family, args, seed: int) -> dict:
    from deployments.schemas import GenerationJob

    job = GenerationJob(
        prompt=PROMPT,
        negative_prompt="",
        width=args.size,
        height=args.size,
        steps=args.steps,
        cfg=3.5,
        seed=seed,
        adapters=[],
    )
    return family.pipeline_kwargs(job)


def generate(pipe, family, args, seed: int):
    """One image as a replica's `_render` makes it."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        return pipe(**job_kwargs(family, args, seed), generator=generator, output_type="pil")


def timed_ms(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000
