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
  - end-to-end HTTP latency / the same generation (pipeline call and PNG encoding) in process,
    with where the HTTP request's time went, hop by hop, from Serve's request logs
    (loadtest/serve_hops.py);
  - throughput of loraplex (1 replica, `--slots` hot adapters, `--clients` concurrent clients)
    on a Zipf workload over the adapters / the naive path on the same requests: load the file,
    generate, unload, one request at a time, in this process (no HTTP, which favours it); beside
    it its bound, (generation + naive load and unload) / generation from the naive path's own
    times, and the share of that bound loraplex reached.
Compiled (loadtest/bench_compile.py; `--no-compile` and `--quick` skip it): compiled / eager
generation, base and one fused adapter; recompiles over 100 adapter switches; a fresh replica's
first image with the node's compile cache / without.
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
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # before torch: same bytes in and out of Serve


from loadtest.bench_http import batching_only, over_http  # noqa: E402
from loadtest.bench_images import generate, log  # noqa: E402
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
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the torch.compile rows (loadtest/bench_compile.py, a few minutes on a CPU; "
        "--quick skips them too: `python -m loadtest.bench_compile --quick` runs them alone)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.swaps, args.requests, args.warmup_requests = 2, 10, 6, 2
        args.http_requests = 2
        args.affinity_adapters, args.affinity_requests, args.size = 4, 6, 128
        args.batch_requests, args.batch_rounds = 8, 1
    return args


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
        if args.compile and not args.quick:  # minutes, even on the tiny model
            compiled(model_dir, lora_root, names, args, figures, details)
    details["total_s"] = round(time.perf_counter() - started, 1)
    return write_reports(Path(args.out), figures, details, args)


# In process -----------------------------------------------------------------------------------


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


def compiled(model_dir, lora_root, names, args, figures, details) -> None:
    """The torch.compile rows (loadtest/bench_compile.py) on the bench model: compiled against
    eager generation, base and one fused adapter, recompiles over 100 adapter switches, and a
    fresh replica's first image with the node's compile cache against without."""
    from deployments import load_pipeline
    from loadtest import bench_compile

    run = bench_compile.CompiledRun(size=args.size, steps=args.steps, repeats=args.repeats)
    files = [lora_root / name for name in names[: bench_compile.HOT_ADAPTERS + 3]]
    log(f"torch.compile rows ({run.backend})")
    measured, times = bench_compile.compiled_figures(
        lambda: load_pipeline("flux", str(model_dir)), files, run
    )
    fresh, fresh_times = bench_compile.fresh_replica_figures(
        ["--model-dir", str(model_dir)], run, model_dir.parent
    )
    figures.update(measured | fresh)
    details["compiled"] = {"backend": run.backend, **times, **fresh_times}


# Reports --------------------------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(1 if main()["details"]["http"]["failed_requests"] else 0)
