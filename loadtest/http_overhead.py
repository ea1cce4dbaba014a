"""Where HTTP serving's time goes: one base request over HTTP against the same generation in
this process, hop by hop.

    python -m loadtest.http_overhead --steps 2 --requests 12
    python -m loadtest.http_overhead --beside-batched   # as make bench deploys it

Serves make bench's Flux model (one replica; `--beside-batched` adds the bench's idle batching
deployment of the same model, as `make bench` measures its HTTP row) on a local Ray cluster
(127.0.0.1 only) and alternates, request by request: an HTTP request, then the same generation
and PNG encoding in this process. Prints the medians of each process's time from Serve's
request logs, and the hops between them (loadtest/serve_hops.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument(
        "--beside-batched", action="store_true", help="deploy the bench's batching model too"
    )
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    import diffusers
    import httpx
    import torch

    from deployments.family import get_family
    from deployments.media import encode_image
    from loadtest import bench, bench_http, serve_hops, service
    from loadtest.adapter_timing import build_pipeline
    from loadtest.bench_images import PROMPT, generate

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
    models = bench_http.bench_models(args) if options.beside_batched else {bench_http.MODEL_NAME: 1}
    try:
        bench_http.deploy("http", work / "model", work / "loras", args, 1, models)
        body = {"prompt": PROMPT, "width": args.size, "height": args.size}
        body.update(steps=args.steps, cfg=3.5, seed=7)
        with httpx.Client(base_url=url, timeout=600) as client:
            for _ in range(3):  # warm-up: a new replica's first calls grow its allocator
                client.post("/flux", json=body).raise_for_status()
            measured = serve_hops.alternate(
                client,
                "/flux",
                body,
                options.requests,
                generate=lambda: generate(pipe, family, args, 7).images[0],
                encode=lambda image: encode_image(image, family.media_type),
                logs=(serve_hops.serve_logs_dir(), "http", bench_http.MODEL_NAME),
            )
    finally:
        service.stop()
        shutil.rmtree(work)  # the model written for this run
    title = f"{args.size}x{args.size}, {args.steps} steps, median of {options.requests}"
    print(serve_hops.markdown(measured.hops(), title))
    print(f"HTTP / in process: {measured.http_ms() / measured.in_process_ms():.3f}")
    print("\n| the local Ray cluster's processes | CPU ms per round |\n|---|---|")
    for name, ms in measured.cluster_cpu_ms.items():
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
