"""Compiled generation's figures (a model's `compile` config), on the replica's own code.

    python -m loadtest.bench_compile           # these rows alone, on the bench model
    python -m loadtest.bench_compile --quick   # on tiny://flux

`compiled_figures`: two replicas of one model side by side, eager and compiled (the denoiser's
repeated blocks through `CompiledGeneration`, inductor), in interleaved rounds:
  - compiled_over_eager_base: a generation without adapter, compiled / eager;
  - compiled_over_eager_fused_adapter: with one adapter (fused, `fuse_single_adapter`), the same;
  - recompiles_in_adapter_switches: graphs compiled again during `switches` renders that each
    switch the adapter stack (one adapter, stacks of two and three, strengths, block weights,
    no adapter, evictions and cold loads into the free slots); 0 is the design.
`fresh_replica_figures`: the first request of a fresh replica, each in a process of its own
started with no inductor cache folder: time from the pipeline loaded to the first image
(compile, compile-cache load and save, warm-up, the request) with the node's compile cache
filled by the process before / with an empty one:
  - fresh_replica_cached_over_uncached.

loadtest/bench.py and loadtest/gpu_adapters.py call both; TARGETS and DESCRIPTIONS are the
rows' entries for the reports.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loadtest.bench_images import bench_job, log

if TYPE_CHECKING:
    from deployments.config import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGETS = {  # figure: (comparison, bound)
    "compiled_over_eager_base": ("<=", 0.85),
    "compiled_over_eager_fused_adapter": ("<=", 0.85),
    "recompiles_in_adapter_switches": ("<=", 0),
    "fresh_replica_cached_over_uncached": ("<=", 0.3),
}
DESCRIPTIONS = {
    "compiled_over_eager_base": "compiled / eager generation, no adapter",
    "compiled_over_eager_fused_adapter": "compiled / eager generation, one fused adapter",
    "recompiles_in_adapter_switches": "recompiles during the mixed adapter switches (a count)",
    "fresh_replica_cached_over_uncached": "a fresh replica's first image (compile, warm-up, "
    "request) with the node's compile cache / without",
}
HOT_ADAPTERS = 4  # loaded for the switches; one more refills an evicted adapter's slot


@dataclass(frozen=True)
class CompiledRun:
    size: int
    """Image width and height, pixels; the warm-up's too."""
    steps: int
    repeats: int
    """Rounds for each median."""
    switches: int = 100
    switch_steps: int | None = None
    """Steps of each switch's render (None: `steps`); graphs do not depend on the count."""
    backend: str = "inductor"


def flux_model(run: CompiledRun, compile_config: dict) -> ModelConfig:
    from deployments.config import ModelConfig

    return ModelConfig(
        name="flux",
        family="flux",
        compile={"enabled": True, "backend": run.backend, **compile_config},
        defaults={"width": run.size, "height": run.size, "steps": run.steps},
    )


class BenchReplica:
    """A pipeline with adapters and a renderer as a replica holds them; compiled (and warmed up)
    when `compile_config` is given."""

    def __init__(self, pipe, run: CompiledRun, compile_config: dict | None):
        from deployments.adapters import PipelineAdapters
        from deployments.compiled import CompiledGeneration
        from deployments.family import get_family
        from deployments.rendering import Renderer
        from deployments.replica_health import ReplicaHealth
        from deployments.replica_metrics import ReplicaMetrics

        family = get_family("flux")
        self.run = run
        self.adapters = PipelineAdapters(
            pipe, family, fuse_single=True, max_adapters=HOT_ADAPTERS + 1
        )
        health = ReplicaHealth(self.adapters, ThreadPoolExecutor(max_workers=1))
        self.renderer = Renderer(pipe, family, self.adapters, health, ReplicaMetrics())
        self.compiled = None
        if compile_config is not None:
            self.compiled = CompiledGeneration(flux_model(run, compile_config), self.renderer)
            self.compiled.start()

    def load(self, path: Path) -> str:
        return self.adapters.load_prepared(self.adapters.prepare(path.read_bytes(), path.name))[0]

    def render(self, active: list, seed: int = 1, steps: int | None = None) -> float:
        """One request's generation, ms."""
        job = bench_job(self.run.size, steps or self.run.steps, seed)
        _, elapsed_ms = self.renderer.render([job], active, threading.Event())
        return elapsed_ms


def compiled_figures(
    make_pipe: Callable[[], object],
    lora_files: list[Path],
    run: CompiledRun,
) -> tuple[dict[str, float], dict]:
    """Compiled / eager generation, base and one fused adapter, and the recompiles of the
    switches (figures), with the times behind them (details). `make_pipe` builds a fresh
    pipeline of the model; `lora_files` holds at least HOT_ADAPTERS + 1 adapters."""
    from deployments.adapters import ActiveAdapter

    log(f"eager and compiled ({run.backend}) replicas")
    eager = BenchReplica(make_pipe(), run, None)
    compiled = BenchReplica(make_pipe(), run, {"cache_dir": None})
    one = {r: [ActiveAdapter(r.load(lora_files[0]), 1.0, 1.0)] for r in (eager, compiled)}
    for replica in (eager, compiled):  # first calls allocate and pick kernels
        replica.render([])
        replica.render(one[replica])
    times: dict[str, list[float]] = {"eager_base": [], "compiled_base": []}
    times |= {"eager_fused_adapter": [], "compiled_fused_adapter": []}
    for _ in range(run.repeats):
        for name, replica in (("eager", eager), ("compiled", compiled)):
            times[f"{name}_base"].append(replica.render([]))
            times[f"{name}_fused_adapter"].append(replica.render(one[replica]))
    median = {name: statistics.median(values) for name, values in times.items()}
    del eager, one  # its pipeline's memory, before the switches (on a GPU: a whole model)
    recompiles, switch_details = adapter_switches(compiled, lora_files, run)
    figures = {
        "compiled_over_eager_base": median["compiled_base"] / median["eager_base"],
        "compiled_over_eager_fused_adapter": median["compiled_fused_adapter"]
        / median["eager_fused_adapter"],
        "recompiles_in_adapter_switches": float(recompiles),
    }
    details = {
        "compiled_ms": {name: round(value, 1) for name, value in median.items()},
        "compile_warmup_ms": compiled.compiled.warmup_ms,
        "switches": switch_details,
    }
    return figures, details


def switch_plan(run: CompiledRun, seed: int = 0) -> list[tuple[str, list]]:
    """`run.switches` steps: ("stack", [(adapter index, strength, block weights or None)]) to
    render, some after ("swap", []): the least recently loaded adapter evicted and a cold file
    loaded into its free slot."""
    rng = random.Random(seed)
    blocks = {"transformer_blocks": 0.0, "single_transformer_blocks": 1.5}
    plan: list[tuple[str, list]] = []
    for i in range(run.switches):
        if i % 10 == 9:
            plan.append(("swap", []))
        size = rng.choice((0, 1, 1, 1, 2, 3))
        chosen = rng.sample(range(HOT_ADAPTERS), size)
        stack = [
            (index, round(rng.uniform(0.2, 1.5), 2), blocks if rng.random() < 0.2 else None)
            for index in chosen
        ]
        plan.append(("stack", stack))
    return plan


def adapter_switches(
    replica: BenchReplica, lora_files: list[Path], run: CompiledRun
) -> tuple[int, dict]:
    """Recompiles during the switch plan on a compiled replica, and what it did."""
    from deployments.adapters import ActiveAdapter

    loaded = [replica.load(path) for path in lora_files[1 : HOT_ADAPTERS + 1]]
    spare = lora_files[HOT_ADAPTERS + 1 :] or lora_files[:1]
    before = replica.compiled.describe()["recompiles"]
    fallbacks_before = replica.renderer.eager_fallbacks
    renders, swaps, render_ms = 0, 0, []
    log(f"{run.switches} adapter switches on the compiled replica")
    for kind, stack in switch_plan(run):
        if kind == "swap":
            evicted = loaded.pop(0)
            replica.adapters.release(evicted)
            loaded.append(replica.load(spare[swaps % len(spare)]))
            swaps += 1
            continue
        scales = [
            ActiveAdapter(
                loaded[index],
                strength,
                strength,
                replica.adapters.block_scales(blocks or {}, "block_weights"),
            )
            for index, strength, blocks in stack
        ]
        render_ms.append(replica.render(scales, seed=renders, steps=run.switch_steps))
        renders += 1
    recompiles = replica.compiled.describe()["recompiles"] - before
    return recompiles, {
        "renders": renders,
        "cold_loads_into_free_slots": swaps,
        "eager_fallbacks": replica.renderer.eager_fallbacks - fallbacks_before,
        "render_median_ms": round(statistics.median(render_ms), 1),
    }


# A fresh replica's first request, in processes of their own -----------------------------------


def fresh_replica_figures(
    pipeline_args: list[str], run: CompiledRun, work: Path
) -> tuple[dict[str, float], dict]:
    """The first image of a fresh replica with the node's compile cache / without: two fresh
    processes on one cache folder, the first finding it empty. `pipeline_args` say how the
    child builds the model (`--model-dir DIR`, or `--gpu-transformer flux1 --device cuda`)."""
    cache_dir = work / "compile-cache"
    without = first_request_process(pipeline_args, run, cache_dir)
    with_cache = first_request_process(pipeline_args, run, cache_dir)
    if (without["compile_cache"], with_cache["compile_cache"]) != ("miss", "hit"):
        raise RuntimeError(
            f"compile cache: expected a miss then a hit, got {without}, {with_cache}"
        )
    figures = {
        "fresh_replica_cached_over_uncached": with_cache["first_image_s"] / without["first_image_s"]
    }
    return figures, {"fresh_replica": {"without_cache": without, "with_cache": with_cache}}


def first_request_process(pipeline_args: list[str], run: CompiledRun, cache_dir: Path) -> dict:
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # The inductor folder a replica finds is the compile cache's own (deployments/compile_cache
    # .py) or none: a shared /tmp one would make the "without" process a hit.
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    command = [sys.executable, "-m", "loadtest.bench_compile", "first-request", *pipeline_args]
    command += ["--cache-dir", str(cache_dir), "--size", str(run.size), "--steps", str(run.steps)]
    command += ["--backend", run.backend, "--threads", str(torch.get_num_threads())]
    log(f"fresh replica, compile cache {'filled' if cache_dir.exists() else 'empty'}")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"first-request process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_request(args: argparse.Namespace) -> dict:
    """In the child: load the model, then start a compiled replica on the cache folder and
    serve one request; how long from the pipeline loaded to the first image."""
    run = CompiledRun(size=args.size, steps=args.steps, repeats=1, backend=args.backend)
    pipe = child_pipeline(args)
    started, started_cpu = time.perf_counter(), cpu_s()
    replica = BenchReplica(pipe, run, {"cache_dir": args.cache_dir})
    request_ms = replica.render([])
    return {
        "first_image_s": round(time.perf_counter() - started, 2),
        # On a shared machine wall time also measures the neighbours; CPU time does not.
        "first_image_cpu_s": round(cpu_s() - started_cpu, 2),
        "compile_cache": replica.compiled.compile_cache,
        "warmup_ms": replica.compiled.warmup_ms,
        "request_ms": round(request_ms, 1),
    }


def cpu_s() -> float:
    """CPU seconds of this process and of its children waited for (g++)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child_pipeline(args: argparse.Namespace):
    if args.model_dir:
        from deployments import load_pipeline

        return load_pipeline("flux", args.model_dir, device=args.device)
    from loadtest.gpu_adapters import build_pipeline

    return build_pipeline(
        argparse.Namespace(device=args.device, small=args.gpu_transformer == "small")
    )


# Standalone ----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("rows", "first-request"), default="rows")
    parser.add_argument("--quick", action="store_true", help="tiny://flux, few switches")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--switches", type=int, default=100)
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    # first-request (the child): where its model comes from, and the cache folder
    parser.add_argument("--model-dir", help="a diffusers Flux folder, or tiny://flux")
    parser.add_argument("--gpu-transformer", choices=("flux1", "small"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.switches = 64, 2, 20
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoder"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "first-request":
        result = first_request(args)
        print(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-compile-") as work:
        return rows(args, Path(work))


def rows(args: argparse.Namespace, work: Path) -> dict:
    """Every row of this module on the bench model (tiny://flux with --quick)."""
    from deployments import load_pipeline
    from deployments.loras.synthetic import lora_tensors, write_lora
    from loadtest.adapter_timing import build_pipeline
    from loadtest.bench import ATTENTION_MLP_TARGETS, BENCH_DEPTH

    model_dir = "tiny://flux"
    if not args.quick:
        model_dir = str(work / "model")
        build_pipeline("bench", BENCH_DEPTH).save_pretrained(model_dir)
    transformer = load_pipeline("flux", model_dir).transformer
    files = []
    for i in range(HOT_ADAPTERS + 3):
        tensors = lora_tensors(transformer, "transformer", i, 16, ATTENTION_MLP_TARGETS)
        files.append(write_lora(work / "loras" / f"bench-{i:02d}.safetensors", tensors))
    run = CompiledRun(
        size=args.size,
        steps=args.steps,
        repeats=args.repeats,
        switches=args.switches,
        backend=args.backend,
    )
    figures, details = compiled_figures(lambda: load_pipeline("flux", model_dir), files, run)
    if run.backend == "inductor":  # only inductor writes compile artifacts
        fresh, fresh_details = fresh_replica_figures(["--model-dir", model_dir], run, work)
        figures |= fresh
        details |= fresh_details
    report = {"figures": {k: round(v, 4) for k, v in figures.items()}, "details": details}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
