"""Why a replica runs all its tensor work on one thread: the same generations from the main
thread, from a second thread once the main thread has used torch, and from one thread that did
all the work (the replica's way).

    python -m loadtest.torch_threads --repeats 9

torch's CPU kernels use GNU OpenMP, which gives each calling thread its own team of worker
threads; once the teams outnumber the cores, they sleep between parallel regions instead of
spinning. Builds make bench's Flux model and three rank-16 LoRAs in each setting, switches
between them (fused, as the bench does) and prints the median generation in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor


def build(adapter_count: int = 3):
    from deployments.adapters import PipelineAdapters
    from deployments.family import get_family
    from deployments.loras.synthetic import lora_tensors
    from loadtest.adapter_timing import build_pipeline
    from loadtest.bench import ATTENTION_MLP_TARGETS, BENCH_DEPTH

    pipe = build_pipeline("bench", BENCH_DEPTH)
    pipe.set_progress_bar_config(disable=True)
    adapters = PipelineAdapters(pipe, get_family("flux"), fuse_single=True)
    for i in range(adapter_count):
        tensors = lora_tensors(pipe.transformer, "transformer", i, 16, ATTENTION_MLP_TARGETS)
        adapters.load(f"a{i}", tensors, f"a{i}")
    return pipe, adapters


def timed_requests(pipe, adapters, repeats: int) -> float:
    """Median ms of `repeats` generations, each switching to the next adapter."""
    from deployments.adapters import ActiveAdapter
    from deployments.family import get_family
    from loadtest.bench import parse_args
    from loadtest.bench_images import generate

    args = parse_args([])
    family = get_family("flux")
    times = []
    for i in range(repeats):
        adapters.activate([ActiveAdapter(f"a{i % 3}", 1.0, 1.0)])
        started = time.perf_counter()
        generate(pipe, family, args, 1)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()

    # One thread for everything first: no other thread has used torch yet.
    with ThreadPoolExecutor(1) as own:
        pipe, adapters = own.submit(build).result()
        alone_ms = own.submit(timed_requests, pipe, adapters, args.repeats).result()
    # The main thread: its own team, the earlier thread's gone with it.
    pipe, adapters = build()
    main_ms = timed_requests(pipe, adapters, args.repeats)
    # A second thread while the main thread's team exists: two teams on the cores.
    with ThreadPoolExecutor(1) as other:
        second_ms = other.submit(timed_requests, pipe, adapters, args.repeats).result()
    print(f"| generation (switching adapters, fused), median of {args.repeats} | ms |")
    print("|---|---|")
    print(f"| one thread did all the work | {alone_ms:.1f} |")
    print(f"| main thread | {main_ms:.1f} |")
    print(f"| a second thread, the main thread's team alive | {second_ms:.1f} |")
    print(f"second thread / main: {second_ms / main_ms:.3f}")


if __name__ == "__main__":
    main()
