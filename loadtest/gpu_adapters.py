"""Adapter costs on a GPU, on a transformer of FLUX.1's size: the in-process half of `make bench`.

    python -m loadtest.gpu_adapters --out loadtest/reports/gpu      # needs CUDA
    python -m loadtest.gpu_adapters --small --device cpu --steps 2  # a smoke run anywhere

The CPU benchmark (loadtest/bench.py) runs a narrow Flux on which a LoRA's work is a larger share
than on the real model. This one builds FluxTransformer2DModel at FLUX.1's own width and depth
(3072 wide, 19 double and 38 single blocks, random bf16 weights: speed does not depend on their
values) with the tiny text encoders and VAE, and renders at FLUX.1's token count (4096 image and
512 text tokens; the tiny VAE down-samples 16x, so that is a 2048-pixel latent grid here). It
times the denoising loop (`output_type="latent"`: the part adapters change), on the same code a
replica runs (`PipelineAdapters`), and writes gpu_adapters.json and .md with these ratios:
  - one active adapter (rank 16, attention and MLP), fused and unfused / base;
  - a request switching between two hot adapters / one repeating an adapter;
  - the switch's activation alone / one generation;
  - cold load as a replica with a full LRU makes it (evict, copy into the free slot) and fresh
    (new layers), each / reading the file's bytes;
  - device memory after `--swaps` evict-and-load cycles / after warm-up;
  - throughput on a Zipf workload (`--zipf-requests` over `--zipf-adapters`, `--slots` hot), one
    request at a time: a replica's path / the naive load-generate-unload path
    (`measure_zipf_workload`). `--steps 4` is a turbo model's request (FLUX.1-schnell's steps);
  - compiled generation (the denoiser's repeated blocks through inductor, as `compile: {enabled:
    true}` runs them) / eager, without adapter and with one fused adapter; recompiles during
    `--switches` mixed adapter switches (rendered in `--switch-steps` steps: graphs do not
    depend on the step count); a fresh replica's first image with the node's compile cache /
    without (two processes of their own). On a GPU unless `--no-compiled`.
The measurements are loadtest/in_process.py's and loadtest/bench_compile.py's, the ones `make
bench` takes on a CPU.
No Ray and no HTTP: the GPU machine this runs on may have neither.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FLUX1_TRANSFORMER = {
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "axes_dims_rope": (16, 56, 56),
}
SMALL_TRANSFORMER = {  # --small: a smoke run on a CPU
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "axes_dims_rope": (8, 12, 12),
}
IMAGE_TOKENS_SIDE = 64  # 64 x 64 = 4096 image tokens, FLUX.1 at 1024 x 1024
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a small transformer (smoke run)")
    parser.add_argument("--steps", type=int, default=28, help="FLUX.1-dev's default")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="rounds for each median")
    parser.add_argument("--swaps", type=int, default=20, help="evict-and-load cycles, then memory")
    parser.add_argument("--slots", type=int, default=4, help="hot adapters during the swaps")
    parser.add_argument("--zipf-adapters", type=int, default=12)
    parser.add_argument("--zipf-requests", type=int, default=12, help="timed, after 4 untimed")
    parser.add_argument("--zipf", type=float, default=1.1, help="the Zipf exponent")
    parser.add_argument("--switches", type=int, default=100, help="compiled: adapter switches")
    parser.add_argument("--switch-steps", type=int, default=2, help="compiled: steps per switch")
    parser.add_argument(
        "--compiled",
        action=argparse.BooleanOptionalAction,
        help="measure the compiled rows (default: on a GPU only): inductor compiles here, twice, "
        "and in two fresh processes",
    )
    parser.add_argument("--out", default="loadtest/reports/gpu")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[gpu_adapters {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_pipeline(args):
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from deployments.flux import build_tiny_flux

    tiny = build_tiny_flux()
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    torch.manual_seed(0)
    # Built on the device, in its dtype: initialising 12 B parameters on a CPU takes minutes, and
    # in float32 they would take 48 GB of device memory before the cast.
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=tiny.transformer.config.in_channels,
            joint_attention_dim=tiny.transformer.config.joint_attention_dim,
            pooled_projection_dim=tiny.transformer.config.pooled_projection_dim,
            guidance_embeds=True,
            **(SMALL_TRANSFORMER if args.small else FLUX1_TRANSFORMER),
        ).eval()
    torch.set_default_dtype(torch.float32)
    pipe = FluxPipeline(**{**tiny.components, "transformer": transformer})
    pipe.to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The adapters this run writes (131 MB each at FLUX.1's size) go with it.
    with tempfile.TemporaryDirectory(prefix="loraplex-gpu-") as lora_root:
        return run(args, Path(lora_root))


def run(args: argparse.Namespace, lora_root: Path) -> dict:
    import diffusers
    import torch

    from deployments.family import get_family
    from deployments.loras.synthetic import lora_tensors, write_lora
    from loadtest.bench import ATTENTION_MLP_TARGETS
    from loadtest.bench_http import zipf_choices
    from loadtest.in_process import Rounds, measure_adapters, measure_zipf_workload

    diffusers.utils.logging.set_verbosity_error()
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("gpu_adapters: no CUDA device here (use --device cpu --small for a smoke)")
    started = time.perf_counter()
    pipe = build_pipeline(args)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    side = IMAGE_TOKENS_SIDE * pipe.vae_scale_factor * 2 // (4 if args.small else 1)
    log(f"pipeline built in {time.perf_counter() - started:.0f} s; latent grid {side} px")

    names = []
    for i in range(max(args.repeats + 2, args.slots + 1, args.zipf_adapters)):
        tensors = lora_tensors(pipe.transformer, "transformer", i, args.rank, ATTENTION_MLP_TARGETS)
        name = f"gpu-{i:02d}.safetensors"
        write_lora(lora_root / name, {k: v.to(torch.bfloat16) for k, v in tensors.items()})
        names.append(name)
    file_mb = (lora_root / names[0]).stat().st_size / 1e6
    log(f"{len(names)} adapters of {file_mb:.1f} MB written")

    def generate() -> None:
        generator = torch.Generator(device="cpu").manual_seed(1)
        with torch.inference_mode():
            pipe(
                prompt=PROMPT,
                width=side,
                height=side,
                num_inference_steps=args.steps,
                guidance_scale=3.5,
                generator=generator,
                output_type="latent",
            )

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def device_memory_mb() -> float:
        return torch.cuda.memory_allocated() / 2**20 if on_gpu else float("nan")

    rounds = Rounds(repeats=args.repeats, swaps=args.swaps, slots=args.slots, fuse=True)
    figures, details = measure_adapters(
        pipe,
        get_family("flux"),
        lora_root,
        names,
        rounds,
        generate=generate,
        memory_mb=device_memory_mb,
        sync=sync,
    )
    zipf_warmup = 4
    sequence = zipf_choices(zipf_warmup + args.zipf_requests, args.zipf_adapters, args.zipf, 0)
    zipf_figures, zipf_details = measure_zipf_workload(
        pipe,
        get_family("flux"),
        lora_root,
        names,
        sequence,
        zipf_warmup,
        args.slots,
        generate,
        sync=sync,
    )
    figures.update(zipf_figures)
    details.update(zipf_details)
    if args.compiled or (args.compiled is None and on_gpu):
        del pipe, generate  # two more of its size follow: eager and compiled
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        compiled_figures, compiled_details = compiled_rows(args, side, lora_root, names)
        figures.update(compiled_figures)
        details.update(compiled_details)
    details.update(
        device=torch.cuda.get_device_name() if on_gpu else "cpu",
        transformer_params_b=round(params / 1e9, 2),
        lora_file_mb=round(file_mb, 1),
        latent_grid_px=side,
        args=vars(args),
        total_s=round(time.perf_counter() - started, 1),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"figures": {k: round(v, 4) for k, v in figures.items()}, "details": details}
    (out / "gpu_adapters.json").write_text(json.dumps(report, indent=2))
    lines = ["| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in figures.items()]
    (out / "gpu_adapters.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(report, indent=2))
    return report


def compiled_rows(args, side: int, lora_root: Path, names: list[str]) -> tuple[dict, dict]:
    """loadtest/bench_compile.py's rows at this script's model size and token count."""
    from loadtest.bench_compile import CompiledRun, compiled_figures, fresh_replica_figures

    run = CompiledRun(
        size=side,
        steps=args.steps,
        repeats=args.repeats,
        switches=args.switches,
        switch_steps=args.switch_steps,
    )
    files = [lora_root / name for name in names]
    figures, details = compiled_figures(lambda: build_pipeline(args), files, run)
    gc.collect()
    child = ["--gpu-transformer", "small" if args.small else "flux1", "--device", args.device]
    fresh, fresh_details = fresh_replica_figures(child, run, lora_root)
    return figures | fresh, details | fresh_details


if __name__ == "__main__":
    main()
