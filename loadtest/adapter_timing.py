"""Adapter switch costs inside one process: a hot scale change vs a cold load of the same file.

    python -m loadtest.adapter_timing --size bench --repeats 7

Builds a Flux pipeline (`tiny`: the tiny:// model; `bench`: the same real classes with a wider,
deeper transformer), writes one random LoRA into a temporary LoRA root, and times, on the same
file in the same run, the median of `--repeats`:
  - reading the file's bytes from the store;
  - a fresh cold load: read, parse, check against the model, load_lora_weights (new layers);
  - a cold load into a free slot, as a replica does it once it has evicted an adapter of the
    same layout: read, prepare (a file layout seen before is neither parsed nor converted
    again), copy its bytes into the evicted adapter's layers (`prepare`, `load_prepared`);
  - a hot scale change: activating the loaded adapter at another strength;
  - a hot block-weight change: the same with other per-block weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

# FLUX.1's block counts (19 double, 38 single) at a quarter of a head count, so as many LoRA layers
# as a real Flux LoRA of the same targets, at a size a CPU builds in seconds.
BENCH_TRANSFORMER = {
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 4,
}


def build_pipeline(size: str, depth: tuple[int, int] | None = None):
    """`depth`: (double, single) block counts in place of FLUX.1's, for a shallower bench."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from deployments.flux import build_tiny_flux

    pipe = build_tiny_flux()
    if size == "tiny":
        return pipe
    torch.manual_seed(0)
    tiny = pipe.transformer.config
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=tiny.in_channels,
        joint_attention_dim=tiny.joint_attention_dim,
        pooled_projection_dim=tiny.pooled_projection_dim,
        guidance_embeds=True,
        axes_dims_rope=(16, 24, 24),
        **{
            **BENCH_TRANSFORMER,
            **({} if depth is None else {"num_layers": depth[0], "num_single_layers": depth[1]}),
        },
    ).eval()
    return FluxPipeline(**{**pipe.components, "transformer": transformer})


def median_ms(action, repeats: int, before=None, after=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
        if after is not None:
            after()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "bench"), default="bench")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adapter-timing-") as folder:
        time_operations(args, Path(folder))


def time_operations(args: argparse.Namespace, root: Path) -> None:
    from deployments.adapters import ActiveAdapter, PipelineAdapters
    from deployments.family import get_family
    from deployments.loras.files import parse_lora_file
    from deployments.loras.store import LoraStore
    from deployments.loras.synthetic import lora_tensors, write_lora

    family = get_family("flux")
    pipe = build_pipeline(args.size)
    adapters = PipelineAdapters(pipe, family, max_adapters=1)
    path = write_lora(
        root / "timing.safetensors", lora_tensors(pipe.transformer, "transformer", 1, args.rank)
    )
    store = LoraStore(str(root))
    ref = store.resolve(path.name)

    def read():
        return store.read_bytes(ref)

    def read_and_check():
        tensors, _ = parse_lora_file(read(), ref.name)
        adapters.check(tensors, ref.name)
        return tensors

    def cold_load():
        adapters.load("timing", read_and_check(), ref.name)

    slot = []

    def slot_load():
        slot.append(adapters.load_prepared(adapters.prepare(read(), ref.name))[0])

    read_ms = median_ms(read, args.repeats)
    check_ms = median_ms(read_and_check, args.repeats)
    cold_ms = median_ms(cold_load, args.repeats, after=lambda: adapters.delete("timing"))
    slot_load()  # a fresh load, then kept as a free slot by its eviction
    adapters.release(slot.pop())
    slot_ms = median_ms(slot_load, args.repeats, after=lambda: adapters.release(slot.pop()))
    release_ms = median_ms(lambda: adapters.release(slot.pop()), args.repeats, before=slot_load)
    adapters.delete(adapters.free_slots()[0])
    cold_load()
    strengths = iter([0.5, 1.0] * args.repeats)
    scale_ms = median_ms(
        lambda: adapters.activate([ActiveAdapter("timing", next(strengths), 1.0)]), args.repeats
    )
    groups = family.block_groups.names
    weights = iter([0.0, 1.0] * args.repeats)

    def block_change():
        scales = adapters.block_scales(dict.fromkeys(groups[:1], next(weights)), "block_weights")
        adapters.activate([ActiveAdapter("timing", 1.0, 1.0, scales)])

    block_ms = median_ms(block_change, args.repeats)

    layers = adapters.layer_count("timing")
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    print(
        f"Flux {args.size}: transformer {params:.1f} M parameters; LoRA rank {args.rank}, "
        f"{path.stat().st_size / 1e6:.2f} MB, {layers} layers; median of {args.repeats}"
    )
    print("| operation | median ms |\n|---|---|")
    print(f"| read the file's bytes | {read_ms:.2f} |")
    print(f"| read, parse and check against the model | {check_ms:.2f} |")
    print(f"| fresh cold load: read, parse, check, load_lora_weights | {cold_ms:.2f} |")
    print(f"| cold load into a free slot: read, prepare, copy the bytes in | {slot_ms:.2f} |")
    print(f"| eviction keeping the layers as a free slot | {release_ms:.2f} |")
    print(f"| hot scale change (activate at a new strength) | {scale_ms:.2f} |")
    print(f"| hot block-weight change | {block_ms:.2f} |")
    print(
        f"fresh cold load / read: {cold_ms / read_ms:.0f} x; into a free slot / read: "
        f"{slot_ms / read_ms:.0f} x; into a free slot / hot scale change: "
        f"{slot_ms / scale_ms:.1f} x"
    )


if __name__ == "__main__":
    main()
