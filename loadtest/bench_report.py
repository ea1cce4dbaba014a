"""The benchmark's report: each ratio with its description and target, as bench.json and
bench.md (loadtest/bench.py measures them)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from loadtest import bench_compile

TARGETS = {  # figure: (comparison, bound)
    "adapter_over_base": ("<=", 1.03),
    "switch_over_repeat": ("<=", 1.02),
    "cold_load_over_read": ("<=", 2.0),
    "loraplex_over_naive_throughput": (">=", 2.0),
    "loraplex_share_of_bound": (">=", 0.9),
    "http_over_in_process": ("<=", 1.05),
    "loads_per_distinct_adapter": ("<=", 1.2),
    "rss_after_swaps_over_warmup": ("<=", 1.05),
    **bench_compile.TARGETS,
}
DESCRIPTIONS = {
    "adapter_over_base": "generation with one active adapter / base generation",
    "unfused_adapter_over_base": "the same, adapter not fused (peft LoRA layers)",
    "switch_over_repeat": "request switching between two hot adapters / repeating one",
    "switch_activation_over_generation": "adapter switch (activation alone) / one generation",
    "cold_load_over_read": "cold load of an adapter (eviction, load into its free slot) / "
    "reading the file's bytes",
    "cold_load_fresh_over_read": "fresh cold load (new layers, load_lora_weights) / reading the "
    "file's bytes",
    "loraplex_over_naive_throughput": "loraplex over HTTP / naive load-generate-unload "
    "throughput (Zipf workload)",
    "loraplex_over_naive_bound": "its bound this run: (generation + naive load and unload) / "
    "generation",
    "loraplex_share_of_bound": "loraplex / naive throughput over its bound",
    "http_over_in_process": "end-to-end HTTP latency / the same generation in process",
    "loads_per_distinct_adapter": "adapter loads / distinct adapters requested (2 replicas)",
    "batched_over_unbatched_throughput": "batched / unbatched throughput, one adapter, "
    "4 concurrent clients",
    "rss_after_swaps_over_warmup": "resident memory after the swaps / after warm-up",
    **bench_compile.DESCRIPTIONS,
}


def meets(figure: str, value: float) -> bool | None:
    if figure not in TARGETS:
        return None
    comparison, bound = TARGETS[figure]
    return value <= bound if comparison == "<=" else value >= bound


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def write_reports(out: Path, figures: dict, details: dict, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine(),
        "figures": {
            name: {
                "ratio": round(value, 4),
                "description": DESCRIPTIONS[name],
                "target": " ".join(map(str, TARGETS[name])) if name in TARGETS else None,
                "met": meets(name, value),
            }
            for name, value in figures.items()
        },
        "details": details,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"loraplex bench ({'quick' if args.quick else 'full'}): {details['model']}, "
        f"{details['transformer_params_m']} M transformer parameters, {args.size}x{args.size}, "
        f"{args.steps} steps, LoRA rank {args.rank} ({details['lora_file_mb']} MB); {machine()}",
        "",
        "| ratio | value | target | met |",
        "|---|---|---|---|",
    ]
    for entry in report["figures"].values():
        met = {True: "yes", False: "**no**", None: ""}[entry["met"]]
        lines.append(
            f"| {entry['description']} | {entry['ratio']:.3f} | {entry['target'] or ''} | {met} |"
        )
    hops = details.get("http", {}).get("hops_ms")
    if hops:  # where the HTTP row's time goes (loadtest/serve_hops.py)
        lines += ["", f"| HTTP request, hop by hop (median of {args.http_requests}) | ms |"]
        lines += ["|---|---|", *(f"| {hop} | {ms:.1f} |" for hop, ms in hops.items())]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report
