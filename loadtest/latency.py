"""Latency over HTTP against a running loraplex: base image, cold (miss) and hot (hit) adapter.

    python -m loadtest.latency --url http://127.0.0.1:8000 --lora-root ./models/loras

Writes fresh random adapters for the tiny model into the LoRA root (so each one's first use is
a real cold load), then times each request end to end. Figures are medians of one run, and the
ratios between them are what to compare across machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path

import httpx


def timed_post(client: httpx.Client, path: str, body: dict) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.post(path, json=body)
    elapsed_ms = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    return elapsed_ms, response


def write_adapters(lora_root: Path, family: str, count: int) -> list[str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from deployments import load_pipeline
    from deployments.family import get_family
    from deployments.loras.synthetic import lora_tensors, write_lora

    spec = get_family(family)
    denoiser = getattr(load_pipeline(family, f"tiny://{family}"), spec.denoiser_component)
    run = uuid.uuid4().hex[:8]
    names = []
    for i in range(count):
        name = f"latency-{run}-{i}.safetensors"
        tensors = lora_tensors(denoiser, spec.denoiser_component, seed=i, targets=spec.lora_targets)
        write_lora(lora_root / name, tensors)
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--lora-root", default="./models/loras")
    parser.add_argument("--endpoint", default="flux")
    parser.add_argument("--family", default="flux")
    parser.add_argument("--adapters", type=int, default=5, help="fresh adapters to time")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    args = parser.parse_args()

    names = write_adapters(Path(args.lora_root), args.family, args.adapters)
    body = {"prompt": "a lighthouse at dusk", "width": args.width, "height": args.height}
    with httpx.Client(base_url=args.url, timeout=600) as client:
        timed_post(client, f"/{args.endpoint}", {**body, "seed": 0})  # warm-up
        base, cold, hot = [], [], []
        for seed, name in enumerate(names):
            base.append(timed_post(client, f"/{args.endpoint}", {**body, "seed": seed})[0])
            lora = {**body, "seed": seed, "lora_name": name}
            lora_path = f"/{args.endpoint}-lora"
            cold_ms, cold_response = timed_post(client, lora_path, lora)
            hot_ms, hot_response = timed_post(client, lora_path, lora)
            assert cold_response.headers["X-LoRA-Cache"] == "miss", "adapter was already hot"
            assert hot_response.headers["X-LoRA-Cache"] == "hit", "adapter was not kept hot"
            cold.append(cold_ms)
            hot.append(hot_ms)

    base_ms, cold_ms, hot_ms = (statistics.median(x) for x in (base, cold, hot))
    print(f"{args.width}x{args.height} /{args.endpoint}, median of {len(names)}:")
    print(f"  base (no LoRA)      {base_ms:8.1f} ms")
    print(f"  LoRA cold (miss)    {cold_ms:8.1f} ms   cold / hot = {cold_ms / hot_ms:.2f}")
    print(f"  LoRA hot (hit)      {hot_ms:8.1f} ms   hot / base = {hot_ms / base_ms:.3f}")


if __name__ == "__main__":
    main()
