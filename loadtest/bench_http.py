"""The bench's figures taken over HTTP, against a Serve app started here (its own local Ray
cluster, 127.0.0.1 only): HTTP latency against the same generation in process, loraplex against
the naive path on a Zipf workload, routing affinity with 2 replicas, and batching
(loadtest/bench.py lists each figure)."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from loadtest import serve_hops
from loadtest.bench_images import PROMPT, generate, log

MODEL_NAME = "flux"
BATCHED_NAME = "flux-batched"  # the same model beside it, with max_batch_size --batch-size


def zipf_choices(count: int, adapters: int, exponent: float, seed: int) -> list[int]:
    """`count` adapter indexes, index k drawn with probability proportional to 1/(k+1)^s."""
    weights = np.arange(1, adapters + 1, dtype=float) ** -exponent
    rng = np.random.default_rng(seed)
    return rng.choice(adapters, size=count, p=weights / weights.sum()).tolist()


def deploy(
    app_name: str,
    model_dir: Path,
    lora_root: Path,
    args,
    replicas: int,
    batch_sizes: dict[str, int] | None = None,
) -> None:
    """The loraplex app under `app_name` at /: one Flux model, `MODEL_NAME`; or, with
    `batch_sizes` ({name: max_batch_size}), one deployment of it per entry, at /<name>."""
    import torch

    from loadtest import service

    batch_sizes = batch_sizes or {MODEL_NAME: 1}
    models = [
        {
            "name": name,
            "family": "flux",
            "model_uri": str(model_dir),
            "endpoint": name,
            "max_adapters_per_replica": args.slots,
            "fuse_single_adapter": args.fuse,
            "max_batch_size": size,
            "batch_wait_timeout_ms": args.batch_wait_ms,
        }
        for name, size in batch_sizes.items()
    ]
    # A replica gets as many torch threads as this process (Ray sets OMP_NUM_THREADS from
    # num_cpus), so in-process and HTTP generations compare like for like.
    options = {
        "num_replicas": replicas,
        "max_ongoing_requests": 16,
        "ray_actor_options": {"num_cpus": torch.get_num_threads()},
    }
    app_args = {"lora_root": str(lora_root), "models": models}
    service.deploy(app_args, dict.fromkeys(batch_sizes, options), app_name)


def post(client: httpx.Client, body: dict) -> tuple[float, httpx.Response]:
    path = "/flux-lora" if "lora_name" in body else "/flux"
    started = time.perf_counter()
    response = client.post(path, json=body)
    return (time.perf_counter() - started) * 1000, response


def check(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text}")


def run_workload(client, bodies: list[dict], clients: int) -> tuple[float, list[httpx.Response]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        responses = [r for _, r in pool.map(lambda body: post(client, body), bodies)]
    return time.perf_counter() - started, responses


def over_http(pipe, family, model_dir, lora_root, names, args, figures, details) -> None:
    import torch
    from ray import serve
    from safetensors.torch import load_file

    from deployments.media import encode_image
    from loadtest import service

    body = {"prompt": PROMPT, "width": args.size, "height": args.size, "steps": args.steps}
    body["cfg"] = 3.5
    choices = zipf_choices(
        args.warmup_requests + args.requests, args.adapters, args.zipf, args.seed
    )
    bodies = [{**body, "seed": 100 + i, "lora_name": names[k]} for i, k in enumerate(choices)]
    warmup, timed = bodies[: args.warmup_requests], bodies[args.warmup_requests :]

    # The naive path first, in this process, before Ray takes its share of the machine; its
    # generations timed apart, for the bound on loraplex's throughput against it.
    def naive(request: dict) -> float:
        """One request the naive way; the ms of its generation and encoding alone."""
        pipe.load_lora_weights(
            load_file(str(lora_root / request["lora_name"])), adapter_name="naive"
        )
        started = time.perf_counter()
        image = generate(pipe, family, args, request["seed"]).images[0]
        encode_image(image, family.media_type)
        generation_ms = (time.perf_counter() - started) * 1000
        pipe.unload_lora_weights()
        return generation_ms

    log(f"naive path: {len(timed)} requests")
    naive_started = time.perf_counter()
    naive_generation_ms = [naive(request) for request in timed]
    naive_s = time.perf_counter() - naive_started

    log("starting Ray and Serve")
    url = service.start(
        4 * torch.get_num_threads() + 2, {n: os.environ[n] for n in service.ENV_PASSED}
    )
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            deploy("bench", model_dir, lora_root, args, 1, bench_models(args))
            for _ in range(3):  # warm-up: a new replica's first calls grow its allocator
                check(post(client, {**body, "seed": 7})[1])

            latency = serve_hops.alternate(
                client,
                "/flux",
                {**body, "seed": 7},
                args.http_requests,
                generate=lambda: generate(pipe, family, args, 7).images[0],
                encode=lambda image: encode_image(image, family.media_type),
                logs=(serve_hops.serve_logs_dir(), "bench", MODEL_NAME),
            )

            log(f"loraplex: {len(warmup)} + {len(timed)} Zipf requests")
            run_workload(client, warmup, args.clients)
            loraplex_s, responses = run_workload(client, timed, args.clients)
            failed = sum(r.status_code != 200 for r in responses)
            cache = [r.headers.get("X-LoRA-Cache", "") for r in responses]
            inference_ms = [float(r.headers.get("X-Inference-Ms", "nan")) for r in responses]
            replicas_one = service.replica_states(url)[MODEL_NAME]
            batching = measure_batching(url, names, args, figures)
            failed += batching["failed_requests"]
            serve.delete("bench")

            log("two replicas: routing affinity")
            deploy("bench-affinity", model_dir, lora_root, args, replicas=2)
            affinity = zipf_choices(
                args.affinity_requests, args.affinity_adapters, args.zipf, args.seed + 1
            )
            affinity_bodies = [
                {**body, "seed": 200 + i, "lora_name": names[k]} for i, k in enumerate(affinity)
            ]
            _, affinity_responses = run_workload(client, affinity_bodies, args.clients)
            failed += sum(r.status_code != 200 for r in affinity_responses)
            time.sleep(0.5)  # the replicas report their counts to the registry asynchronously
            replicas_two = service.replica_states(url)[MODEL_NAME]
    finally:
        service.stop()

    loads = [r["adapter_loads"] for r in replicas_two]
    figures["http_over_in_process"] = latency.http_ms() / latency.in_process_ms()
    throughput = naive_s / loraplex_s
    # What loraplex could reach at best, serving each request in one generation: the naive
    # path's time over its generations' (the rest is its loads and unloads).
    bound = naive_s / (sum(naive_generation_ms) / 1000)
    figures["loraplex_over_naive_throughput"] = throughput
    figures["loraplex_over_naive_bound"] = bound
    figures["loraplex_share_of_bound"] = throughput / bound
    figures["loads_per_distinct_adapter"] = sum(loads) / len(set(affinity))
    details["http"] = {
        "http_ms": round(latency.http_ms(), 1),
        "in_process_ms": round(latency.in_process_ms(), 1),
        "same_bytes_http_and_in_process": latency.same_bytes,
        "hops_ms": dict(latency.hops()),
        "cluster_cpu_ms_per_round": latency.cluster_cpu_ms,
        "loraplex_requests_per_s": round(len(timed) / loraplex_s, 3),
        "naive_requests_per_s": round(len(timed) / naive_s, 3),
        "naive_generation_ms_median": round(statistics.median(naive_generation_ms), 1),
        "naive_load_and_unload_ms_per_request": round(
            (naive_s * 1000 - sum(naive_generation_ms)) / len(timed), 1
        ),
        "zipf_cache_hit_rate": round(cache.count("hit") / len(cache), 3),
        "zipf_inference_ms_median": round(statistics.median(inference_ms), 1),
        "zipf_inference_share_of_wall": round(sum(inference_ms) / 1000 / loraplex_s, 3),
        "zipf_distinct_adapters": len(set(choices)),
        "one_replica": replicas_one,
        "affinity_distinct_adapters": len(set(affinity)),
        "affinity_loads_per_replica": loads,
        "batching": batching,
        "failed_requests": failed,
    }


def bench_models(args) -> dict[str, int]:
    """The bench app's deployments: the model, and the same model batching (idle until
    `measure_batching`; deployed with the first so that no run waits for a second deploy)."""
    return {MODEL_NAME: 1, BATCHED_NAME: args.batch_size}


def batching_only(model_dir, lora_root, names, args, figures, details) -> None:
    import torch

    from loadtest import service

    log("starting Ray and Serve")
    url = service.start(
        4 * torch.get_num_threads() + 2, {n: os.environ[n] for n in service.ENV_PASSED}
    )
    try:
        deploy("bench", model_dir, lora_root, args, 1, bench_models(args))
        batching = measure_batching(url, names, args, figures)
    finally:
        service.stop()
    details["http"] = {"batching": batching, "failed_requests": batching["failed_requests"]}


def measure_batching(url: str, names, args, figures) -> dict:
    """Throughput of the bench app's two deployments of the same model, one batching up to
    `--batch-size` requests and one not, on the same requests: `--clients` clients, one
    adapter, one size, seeds apart. Rounds alternate between the two, so drift in the
    machine's load hits both."""
    from loadtest import service

    body = {"prompt": PROMPT, "width": args.size, "height": args.size, "steps": args.steps}
    body.update(cfg=3.5, lora_name=names[0])
    bodies = [{**body, "seed": 300 + i} for i in range(args.batch_requests)]
    log(
        f"batching: {args.batch_rounds} rounds of {len(bodies)} requests, max_batch_size 1 "
        f"and {args.batch_size}"
    )
    seconds = {MODEL_NAME: 0.0, BATCHED_NAME: 0.0}
    failed = 0
    with httpx.Client(base_url=url, timeout=600) as client:

        def run(name: str, requests: list[dict]) -> float:
            nonlocal failed
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                responses = list(pool.map(lambda b: client.post(f"/{name}-lora", json=b), requests))
            failed += sum(r.status_code != 200 for r in responses)
            return time.perf_counter() - started

        for name in seconds:  # warm-up: the adapter loaded, a first batch
            run(name, bodies[: args.clients])
        for _ in range(args.batch_rounds):
            for name in seconds:
                seconds[name] += run(name, bodies)
    time.sleep(0.5)  # the replicas report their counters asynchronously
    states = service.replica_states(url)
    requests = len(bodies) * args.batch_rounds
    rates = {name: requests / elapsed_s for name, elapsed_s in seconds.items()}
    figures["batched_over_unbatched_throughput"] = rates[BATCHED_NAME] / rates[MODEL_NAME]
    return {
        "max_batch_size": args.batch_size,
        "batch_wait_timeout_ms": args.batch_wait_ms,
        "requests_per_s": {
            "unbatched": round(rates[MODEL_NAME], 3),
            "batched": round(rates[BATCHED_NAME], 3),
        },
        "batched_replica": {
            key: states[BATCHED_NAME][0].get(key) for key in ("batches_run", "requests_batched")
        },
        "failed_requests": failed,
    }
