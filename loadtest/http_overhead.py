"""Where HTTP serving's time goes: one base request over HTTP against the same generation in
this process, split by the replica's own `X-Inference-Ms` (its pipeline call).

    python -m loadtest.http_overhead --steps 2 --requests 12

Serves make bench's Flux model (one replica, as `make bench` deploys it) on a local Ray cluster
(127.0.0.1 only) and alternates, request by request: an HTTP request, then the same generation
and PNG encoding in this process. Prints the medians: HTTP round trip, the replica's pipeline
call, and in this process the pipeline call with and without encoding.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--requests", type=int, default=12)
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    import diffusers
    import httpx
    import torch

    from deployments.family import get_family
    from deployments.media import encode_image
    from loadtest import bench, service
    from loadtest.adapter_timing import build_pipeline

    diffusers.utils.logging.set_verbosity_error()
    args = bench.parse_args(["--steps", str(options.steps)])
    pipe = build_pipeline("bench", bench.BENCH_DEPTH)
    pipe.set_progress_bar_config(disable=True)
    work = Path(tempfile.mkdtemp(prefix="loraplex-http-"))
    pipe.save_pretrained(work / "model")
    (work / "loras").mkdir()
    family = get_family("flux")
    env = {name: os.environ[name] for name in service.ENV_PASSED}
    url = service.start(4 * torch.get_num_threads() + 2, env)
    try:
        bench.deploy("http", work / "model", work / "loras", args, 1, {bench.MODEL_NAME: 1})
        body = {"prompt": bench.PROMPT, "width": args.size, "height": args.size}
        body.update(steps=args.steps, cfg=3.5, seed=7)
        rows = []
        with httpx.Client(base_url=url, timeout=600) as client:
            client.post("/flux", json=body).raise_for_status()  # warm-up
            for _ in range(options.requests):
                started = time.perf_counter()
                response = client.post("/flux", json=body)
                response.raise_for_status()
                http_ms = (time.perf_counter() - started) * 1000
                started = time.perf_counter()
                image = bench.generate(pipe, family, args, 7).images[0]
                generation_ms = (time.perf_counter() - started) * 1000
                encode_image(image, family.media_type)
                local_ms = (time.perf_counter() - started) * 1000
                replica_ms = float(response.headers["X-Inference-Ms"])
                rows.append((http_ms, replica_ms, local_ms, generation_ms))
    finally:
        service.stop()
        shutil.rmtree(work)  # the model written for this run
    http, replica, local, generation = (
        statistics.median(column) for column in zip(*rows, strict=True)
    )
    print(f"| {args.size}x{args.size}, {args.steps} steps, median of {options.requests} | ms |")
    print("|---|---|")
    print(f"| HTTP round trip | {http:.1f} |")
    print(f"| the replica's pipeline call (X-Inference-Ms) | {replica:.1f} |")
    print(f"| in process: pipeline call and PNG encoding | {local:.1f} |")
    print(f"| in process: pipeline call | {generation:.1f} |")
    print(
        f"HTTP / in process: {http / local:.3f}; replica / in-process pipeline call: "
        f"{replica / generation:.3f}"
    )


if __name__ == "__main__":
    main()
