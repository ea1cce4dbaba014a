"""A bounded Locust run against a loraplex started here from a Serve config file.

    python -m loadtest.run_locust --config cluster/local.yaml --users 8 --run-time 2m

Starts the config's models (all, or `--models`) in a local Ray cluster of its own with Serve on
127.0.0.1, writes `--adapters` random LoRAs per model into a temporary LoRA root, runs
`locust --headless` (loadtest/locustfile.py) for `--run-time`, and writes under `--out`:
Locust's CSV files (locust_*.csv) and HTML report (locust.html), and summary.json/summary.md:
requests/s, p50/p95/p99 latency, failures, the adapter cache hit rate from the X-LoRA-Cache
headers and from the deployments' own counters (/models), adapter loads and file reads per
replica, and the share of the run each replica spent in pipeline calls. Exits 1 when a request
failed or none completed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from loadtest import service  # noqa: E402

# Not imported from the locustfile: importing locust monkey-patches the process (gevent).
ADAPTER_PATTERN = "loadtest-{family}-{index:02d}.safetensors"

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cluster/local.yaml", help="Serve config file")
    parser.add_argument("--models", default="", help="comma-separated model names; all if empty")
    parser.add_argument("--endpoints", default="", help="endpoint=weight list; all if empty")
    parser.add_argument("--adapters", type=int, default=16, help="adapters per model")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf popularity exponent")
    parser.add_argument("--base-share", type=float, default=0.2, help="requests without LoRA")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=2.0)
    parser.add_argument("--run-time", default="2m", help="Locust's -t: 30s, 2m, ...")
    parser.add_argument("--out", default="loadtest/reports/locust")
    return parser.parse_args(argv)


def write_adapters(models: list[dict], lora_root: Path, count: int) -> int:
    """`count` random LoRAs per model family, named as the locustfile expects."""
    from deployments import load_pipeline
    from deployments.config import ModelConfig
    from deployments.family import get_family
    from deployments.loras.synthetic import lora_tensors, write_lora

    written = 0
    for model in map(ModelConfig.model_validate, models):
        spec = get_family(model.family)
        if (lora_root / ADAPTER_PATTERN.format(family=model.family, index=0)).exists():
            continue  # another model of the same family
        denoiser = getattr(
            load_pipeline(model.family, model.model_uri, "float32", "cpu"), spec.denoiser_component
        )
        for index in range(count):
            tensors = lora_tensors(
                denoiser, spec.denoiser_component, seed=index, targets=spec.lora_targets
            )
            write_lora(
                lora_root / ADAPTER_PATTERN.format(family=model.family, index=index), tensors
            )
            written += 1
    return written


def run_locust(url: str, args, out: Path) -> int:
    env = {
        **os.environ,
        "LORAPLEX_ADAPTERS": str(args.adapters),
        "LORAPLEX_ADAPTER_PATTERN": ADAPTER_PATTERN,
        "LORAPLEX_ZIPF": str(args.zipf),
        "LORAPLEX_BASE_SHARE": str(args.base_share),
        "LORAPLEX_WIDTH": str(args.width),
        "LORAPLEX_HEIGHT": str(args.height),
        "LORAPLEX_STEPS": str(args.steps),
        "LORAPLEX_CACHE_STATS": str(out / "cache_headers.json"),
    }
    if args.endpoints:
        env["LORAPLEX_ENDPOINTS"] = args.endpoints
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "-u",
        str(args.users),
        "-r",
        str(args.spawn_rate),
        "-t",
        args.run_time,
        # Requests in flight at the end finish (a cut connection would cancel the generation).
        "--stop-timeout",
        "120",
        "--host",
        url,
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "locust.html"),
    ]
    return subprocess.run(command, env=env, check=False).returncode


def read_stats(path: Path) -> list[dict]:
    with path.open() as stats:
        return list(csv.DictReader(stats))


def busy_shares(
    before: dict[str, list[dict]], after: dict[str, list[dict]], run_s: float
) -> dict[str, dict[str, float]]:
    """Per model and replica: the share of the run's wall time (ramp-up and the last requests'
    end included) the replica spent in pipeline calls."""
    rendered_before = {r["replica_id"]: r["render_s"] for states in before.values() for r in states}
    return {
        model: {
            r["replica_id"]: round(
                (r["render_s"] - rendered_before.get(r["replica_id"], 0)) / run_s, 3
            )
            for r in states
        }
        for model, states in after.items()
    }


def summarize(
    out: Path,
    replicas: dict[str, list[dict]],
    args,
    locust_rc: int,
    busy: dict[str, dict[str, float]],
) -> dict:
    rows = read_stats(out / "locust_stats.csv")

    def figures(row: dict) -> dict:
        return {
            "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "requests_per_s": round(float(row["Requests/s"]), 3),
            "p50_ms": float(row["50%"]),
            "p95_ms": float(row["95%"]),
            "p99_ms": float(row["99%"]),
        }

    total = next(row for row in rows if row["Name"] == "Aggregated")
    headers_path = out / "cache_headers.json"
    headers = json.loads(headers_path.read_text()) if headers_path.exists() else {}
    hits = sum(counts.get("hit", 0) for counts in headers.values())
    misses = sum(counts.get("miss", 0) for counts in headers.values())
    deployments = {}
    for model, states in replicas.items():
        loads = sum(r["adapter_loads"] for r in states)
        replica_hits = sum(r["adapter_hits"] for r in states)
        deployments[model] = {
            "hit_rate": round(replica_hits / (replica_hits + loads), 3) if loads else None,
            "adapter_loads_per_replica": {r["replica_id"]: r["adapter_loads"] for r in states},
            # Of those, loads that built new layers: no evicted adapter's slot fit.
            "adapter_fresh_loads_per_replica": {
                r["replica_id"]: r["adapter_fresh_loads"] for r in states
            },
            "adapter_evictions": sum(r["adapter_evictions"] for r in states),
            # Cold files read per replica; requests that shared another's read are not in it.
            "adapter_file_reads_per_replica": {
                r["replica_id"]: r["adapter_file_reads"] for r in states
            },
            "adapter_file_reads_shared": sum(r["adapter_file_reads_shared"] for r in states),
            # The share of the run each replica spent in pipeline calls (its GPU busy, on GPUs).
            "busy_share_per_replica": busy.get(model, {}),
            "rss_mb_per_replica": {r["replica_id"]: r["rss_mb"] for r in states},
            # Reads of lora_root against reads of the node's copy (None: the cache is off).
            "lora_root_cache_per_replica": {
                r["replica_id"]: _reads(r.get("lora_root_cache")) for r in states
            },
        }
    summary = {
        **figures(total),
        "locust_exit_code": locust_rc,
        "per_endpoint": {row["Name"]: figures(row) for row in rows if row["Name"] != "Aggregated"},
        "cache_hit_rate_headers": round(hits / (hits + misses), 3) if hits + misses else None,
        "cache_headers": headers,
        "deployments": deployments,
        "settings": vars(args),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"Locust: {args.users} users, {args.run_time}, {args.adapters} adapters per model, "
        f"Zipf {args.zipf}, base share {args.base_share}, {args.width}x{args.height}, "
        f"{args.steps} steps",
        "",
        "| endpoint | requests | failures | req/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in [*summary["per_endpoint"].items(), ("all", figures(total))]:
        lines.append(
            f"| {name} | {row['requests']} | {row['failures']} | {row['requests_per_s']} | "
            f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['p99_ms']:.0f} |"
        )
    lines += [
        "",
        f"Adapter cache hit rate: {summary['cache_hit_rate_headers']} (X-LoRA-Cache headers)",
        "",
        "| deployment | hit rate (replica counters) | adapter loads per replica | of them fresh "
        "| evictions | file reads per replica | reads shared | busy share per replica |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, entry in deployments.items():
        loads = list(entry["adapter_loads_per_replica"].values())
        fresh = list(entry["adapter_fresh_loads_per_replica"].values())
        reads = list(entry["adapter_file_reads_per_replica"].values())
        busy_share = list(entry["busy_share_per_replica"].values())
        lines.append(
            f"| {model} | {entry['hit_rate']} | {loads} | {fresh} | {entry['adapter_evictions']} "
            f"| {reads} | {entry['adapter_file_reads_shared']} | {busy_share} |"
        )
    cached = {
        model: list(entry["lora_root_cache_per_replica"].values())
        for model, entry in deployments.items()
        if any(entry["lora_root_cache_per_replica"].values())
    }
    if cached:
        lines += ["", "Node cache of lora_root per replica (reads of lora_root, of the copy):"]
        lines += [f"- {model}: {reads}" for model, reads in cached.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def _reads(cache: dict | None) -> dict | None:
    return None if cache is None else {"downloads": cache["downloads"], "hits": cache["hits"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app_args, options, env_vars = service.read_config(Path(args.config))
    if args.models:
        wanted = set(args.models.split(","))
        app_args = {**app_args, "models": [m for m in app_args["models"] if m["name"] in wanted]}
        missing = wanted - {m["name"] for m in app_args["models"]}
        if missing:
            raise SystemExit(f"--models: not in {args.config}: {sorted(missing)}")
    env = {**env_vars, **{name: os.environ[name] for name in service.ENV_PASSED}}
    # The adapters this run writes go with it.
    with tempfile.TemporaryDirectory(prefix="loraplex-locust-") as lora_root:
        app_args = {**app_args, "lora_root": lora_root}
        write_adapters(app_args["models"], Path(lora_root), args.adapters)
        url = service.start(num_cpus=8, env_vars=env)
        try:
            started = time.perf_counter()
            service.deploy(app_args, options, "loraplex")
            print(f"service ready at {url} in {time.perf_counter() - started:.0f} s", flush=True)
            before = service.replica_states(url)
            run_started = time.perf_counter()
            locust_rc = run_locust(url, args, out)
            run_s = time.perf_counter() - run_started
            time.sleep(0.5)  # replicas report their counters to the registry asynchronously
            replicas = service.replica_states(url)
        finally:
            service.stop()
    summary = summarize(out, replicas, args, locust_rc, busy_shares(before, replicas, run_s))
    return 0 if summary["requests"] and not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
