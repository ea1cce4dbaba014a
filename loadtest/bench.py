"""Does the hot-adapter design pay? Ratios taken in one run, on one machine.

    python -m loadtest.bench            # the full run (make bench), a few minutes on a CPU
    python -m loadtest.bench --quick    # the CI smoke: tiny model, a handful of requests

Builds a Flux pipeline of the "bench" size (the real diffusers classes, 4 heads of 64 (256 wide;
FLUX.1: 3072) and a quarter of FLUX.1's depth, wide enough that matrix work dominates each step,
as on a real model; `--quick` uses the tiny:// model), writes `--adapters` random LoRAs (rank 16 on
attention and MLP) into a temporary LoRA root, and measures:

In this process, with the replica's own code (PipelineAdapters, LoraStore):
  - generation with one active adapter / base generation;
  - a request that switches between two hot adapters / a request that repeats one;
  - a cold load of an adapter as a replica makes it once its LRU is full: evict the least
    recently used adapter, keeping its layers as a free slot, then read the new file and copy
    its bytes into that slot (a layout seen before: no parse, no conversion) / reading the
    file's bytes just before (and, for comparison, a fresh load: read, parse, check,
    load_lora_weights building new layers; and a slot load through parse and conversion);
  - resident memory after `--swaps` adapter swaps (evict, load into the free slot) through an
    LRU of `--slots` / after warm-up.
Over HTTP, against a Serve app started here (its own local Ray cluster, 127.0.0.1 only):
  - end-to-end HTTP latency / the same generation (pipeline call and PNG encoding) in process;
  - throughput of loraplex (1 replica, `--slots` hot adapters, `--clients` concurrent clients)
    on a Zipf workload over the adapters / the naive path on the same requests: load the file,
    generate, unload, one request at a time, in this process (no HTTP, which favours it);
  - with 2 replicas, adapter loads / distinct adapters requested, on a Zipf workload over
    `--affinity-adapters` adapters (fewer than the 2 replicas' slots, so every load beyond one
    per adapter is a routing miss, not an eviction);
  - throughput with batching (`max_batch_size` `--batch-size`) / without (1), `--clients`
    concurrent clients sending requests alike but for their seed (one adapter, one size): two
    deployments of the same model side by side in the app, measured in interleaved rounds.
    `--only-batching` measures this figure alone.

Writes bench.json and bench.md under `--out` (loadtest/reports by default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # before torch: same bytes in and out of Serve

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from loadtest.bench_report import write_reports  # noqa: E402

# Flux modules a LoRA trained on "attention and MLP" targets: joint attention of the double
# blocks, both feed-forwards, and the single blocks' attention and fused MLP projections.
ATTENTION_MLP_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)
BENCH_DEPTH = (5, 10)  # double, single blocks: a quarter of FLUX.1's 19 and 38
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
MODEL_NAME = "flux"
BATCHED_NAME = "flux-batched"  # the same model beside it, with max_batch_size --batch-size
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny model, few requests")
    parser.add_argument("--out", default="loadtest/reports", help="folder for bench.json/.md")
    parser.add_argument("--adapters", type=int, default=32, help="adapters in the Zipf workload")
    parser.add_argument("--slots", type=int, default=8, help="hot adapters per replica")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf popularity exponent")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="image width and height, pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="rounds for each median")
    parser.add_argument("--swaps", type=int, default=500, help="adapter swaps before RSS")
    parser.add_argument("--requests", type=int, default=32, help="timed Zipf requests")
    parser.add_argument("--warmup-requests", type=int, default=16, help="untimed, before them")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument(
        "--http-requests", type=int, default=11, help="rounds of HTTP against in process"
    )
    parser.add_argument("--affinity-adapters", type=int, default=12)
    parser.add_argument("--affinity-requests", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4, help="max_batch_size, batched app")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0, help="its wait for a batch")
    parser.add_argument("--batch-requests", type=int, default=16, help="per app and round")
    parser.add_argument("--batch-rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--only-batching",
        action="store_true",
        help="measure only batched / unbatched throughput (no in-process, Zipf or affinity run)",
    )
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads here and in each replica (0: torch's default); 1 keeps a shared, "
        "oversubscribed machine from stalling spinning OpenMP threads",
    )
    parser.add_argument(
        "--no-fuse",
        dest="fuse",
        action="store_false",
        help="measure without fuse_single_adapter (the config option, on by default here)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.swaps, args.requests, args.warmup_requests = 2, 10, 6, 2
        args.http_requests = 2
        args.affinity_adapters, args.affinity_requests, args.size = 4, 6, 128
        args.batch_requests, args.batch_rounds = 8, 1
    return args


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The model and adapters this run writes (about 260 MB for the full run) go with it.
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as work:
        return run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> dict:
    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoder", x500
    if args.threads:
        torch.set_num_threads(args.threads)  # replicas get as many (deploy: num_cpus)

    from deployments.family import get_family
    from deployments.loras.synthetic import lora_tensors, write_lora
    from loadtest.adapter_timing import build_pipeline

    started = time.perf_counter()
    pipe = build_pipeline("tiny" if args.quick else "bench", None if args.quick else BENCH_DEPTH)
    pipe.set_progress_bar_config(disable=True)
    model_dir = work / "model"
    pipe.save_pretrained(model_dir)  # the replicas load the same weights from here
    lora_root = work / "loras"
    names = []
    for i in range(args.adapters):
        name = f"bench-{i:02d}.safetensors"
        tensors = lora_tensors(pipe.transformer, "transformer", i, args.rank, ATTENTION_MLP_TARGETS)
        write_lora(lora_root / name, tensors)
        names.append(name)

    log(f"model and {len(names)} adapters written under {work}")
    family = get_family("flux")
    figures: dict[str, float] = {}
    details: dict = {
        "model": "tiny://flux" if args.quick else f"bench Flux, depth {BENCH_DEPTH}",
        "transformer_params_m": round(
            sum(p.numel() for p in pipe.transformer.parameters()) / 1e6, 1
        ),
        "lora_file_mb": round((lora_root / names[0]).stat().st_size / 1e6, 2),
        "torch_threads": torch.get_num_threads(),
        "args": vars(args),
    }
    if args.only_batching:
        batching_only(model_dir, lora_root, names, args, figures, details)
    else:
        in_process(pipe, family, lora_root, names, args, figures, details)
        over_http(pipe, family, model_dir, lora_root, names, args, figures, details)
    details["total_s"] = round(time.perf_counter() - started, 1)
    return write_reports(Path(args.out), figures, details, args)


# In process -----------------------------------------------------------------------------------


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


def in_process(pipe, family, lora_root, names, args, figures, details) -> None:
    from deployments.replica_metrics import resident_memory_mb
    from loadtest.in_process import Rounds, measure_adapters

    rounds = Rounds(repeats=args.repeats, swaps=args.swaps, slots=args.slots, fuse=args.fuse)
    measured, times = measure_adapters(
        pipe,
        family,
        lora_root,
        names,
        rounds,
        generate=lambda: generate(pipe, family, args, 1),
        memory_mb=resident_memory_mb,
    )
    measured["rss_after_swaps_over_warmup"] = measured.pop("memory_after_swaps_over_warmup")
    figures.update(measured)
    details["in_process_ms"] = times["in_process_ms"]
    details["rss_mb"] = times["memory_mb"]


# Over HTTP ------------------------------------------------------------------------------------


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

    # The naive path first, in this process, before Ray takes its share of the machine.
    def naive(request: dict) -> None:
        pipe.load_lora_weights(
            load_file(str(lora_root / request["lora_name"])), adapter_name="naive"
        )
        image = generate(pipe, family, args, request["seed"]).images[0]
        encode_image(image, family.media_type)
        pipe.unload_lora_weights()

    log(f"naive path: {len(timed)} requests")
    naive_started = time.perf_counter()
    for request in timed:
        naive(request)
    naive_s = time.perf_counter() - naive_started

    def in_process_request() -> bytes:
        image = generate(pipe, family, args, 7).images[0]
        return encode_image(image, family.media_type)

    log("starting Ray and Serve")
    url = service.start(
        4 * torch.get_num_threads() + 2, {n: os.environ[n] for n in service.ENV_PASSED}
    )
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            deploy("bench", model_dir, lora_root, args, 1, bench_models(args))
            for _ in range(3):  # warm-up: a new replica's first calls grow its allocator
                check(post(client, {**body, "seed": 7})[1])

            http_ms, local_ms, same_bytes = [], [], True
            for _ in range(args.http_requests):
                elapsed_ms, response = post(client, {**body, "seed": 7})
                check(response)
                http_ms.append(elapsed_ms)
                local_ms.append(timed_ms(in_process_request))
                same_bytes &= response.content == in_process_request()

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
    figures["http_over_in_process"] = statistics.median(http_ms) / statistics.median(local_ms)
    figures["loraplex_over_naive_throughput"] = (len(timed) / loraplex_s) / (len(timed) / naive_s)
    figures["loads_per_distinct_adapter"] = sum(loads) / len(set(affinity))
    details["http"] = {
        "http_ms": round(statistics.median(http_ms), 1),
        "in_process_ms": round(statistics.median(local_ms), 1),
        "same_bytes_http_and_in_process": same_bytes,
        "loraplex_requests_per_s": round(len(timed) / loraplex_s, 3),
        "naive_requests_per_s": round(len(timed) / naive_s, 3),
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


# Reports --------------------------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(1 if main()["details"]["http"]["failed_requests"] else 0)
