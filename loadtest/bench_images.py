"""The bench's image: one prompt at the run's size and steps, made as a replica's Renderer
(deployments/rendering.py) makes it, and the bench's log line."""

from __future__ import annotations

import sys
import time

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_job(size: int, steps: int, seed: int):
    """The bench's request as a replica receives it: PROMPT, square, no adapter."""
    from deployments.schemas import GenerationJob

    return GenerationJob(
        prompt=PROMPT,
        negative_prompt="",
        width=size,
        height=size,
        steps=steps,
        cfg=3.5,
        seed=seed,
        adapters=[],
    )


def job_kwargs(family, args, seed: int) -> dict:
    return family.pipeline_kwargs(bench_job(args.size, args.steps, seed))


def generate(pipe, family, args, seed: int):
    """One image as a replica's Renderer makes it."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        return pipe(**job_kwargs(family, args, seed), generator=generator, output_type="pil")


def timed_ms(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000
