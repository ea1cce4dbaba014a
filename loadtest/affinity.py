"""Routing affinity under bursts: adapter loads per distinct adapter, Serve's router and ours.

    python -m loadtest.affinity [--rounds 5 --adapters 6 --burst 4 --replicas 2]
                                [--ingress-replicas 1]

Deploys the tiny Flux model with `--replicas` replicas twice, once with Serve's default
request router and once with loraplex's (serve/adapter_router.py), on a Ray cluster of its own
at 127.0.0.1. Each round sends, all at once, `--burst` requests for each of `--adapters`
adapters no replica holds yet; the replicas' own load counters then give how many loads the
round cost. Every replica has slots for every adapter, so each load beyond one per adapter is
the router's doing: a request sent to a replica that did not hold the adapter while another
was loading it. Prints a table, and writes it as JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROUTERS = {
    "Serve's default": "ray.serve._private.request_router.pow_2_router:"
    "PowerOfTwoChoicesRequestRouter",
    "loraplex (AdapterAffinityRouter)": "serve.adapter_router:AdapterAffinityRouter",
}
MODEL = {"name": "flux", "family": "flux", "model_uri": "tiny://flux", "endpoint": "flux"}
BODY = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--adapters", type=int, default=6, help="new adapters per round")
    parser.add_argument("--burst", type=int, default=4, help="concurrent requests per adapter")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--ingress-replicas", type=int, default=1, help="each has a router of its own"
    )
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from loadtest.run_locust import ADAPTER_PATTERN, write_adapters

    count = args.rounds * args.adapters
    names = [ADAPTER_PATTERN.format(family="flux", index=i) for i in range(count)]
    with tempfile.TemporaryDirectory(prefix="loraplex-affinity-") as folder:
        write_adapters([MODEL], Path(folder), count)
        num_cpus = max(4, args.replicas + 2)
        results = per_router(measure, Path(folder), names, args, num_cpus=num_cpus)
    print("| router | requests | adapters | loads | loads / adapter | per replica | failures |")
    print("|---|---|---|---|---|---|---|")
    for label, row in results.items():
        print(
            f"| {label} | {row['requests']} | {row['adapters']} | {row['loads']} | "
            f"{row['loads_per_adapter']:.3f} | {row['loads_per_replica']} | {row['failures']} |"
        )
    write_results(args, results)
    return results


def per_router(measure, lora_root: Path, names: list[str], args, num_cpus: int) -> dict:
    """`measure(url, lora_root, names, router, args)` for each of `ROUTERS`, by label, on a
    local Ray cluster of its own."""
    from loadtest import service

    env = {name: os.environ[name] for name in service.ENV_PASSED if name in os.environ}
    url = service.start(num_cpus, env)
    try:
        return {
            label: measure(url, lora_root, names, router, args) for label, router in ROUTERS.items()
        }
    finally:
        service.stop()


def write_results(args, results: dict) -> None:
    """The figures as JSON in `args.out`, with the arguments that gave them, if asked."""
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, **results}))


def deploy_flux(lora_root: Path, model: dict, options: dict, app_name: str, args) -> None:
    """The tiny Flux `model` with these deployment options, behind `args.ingress_replicas`
    ingress replicas (each with a router of its own), as app `app_name`."""
    from loadtest import service

    ingress = {"num_replicas": args.ingress_replicas, "ray_actor_options": {"num_cpus": 0.25}}
    service.deploy(
        {"lora_root": str(lora_root), "models": [model]},
        {"flux": options, "Ingress": ingress},
        app_name,
    )


def measure(url: str, lora_root: Path, names: list[str], router: str, args) -> dict:
    """Every round's burst against a fresh deployment that uses `router`."""
    import httpx
    from ray import serve

    model = {**MODEL, "max_adapters_per_replica": len(names)}
    options = {
        "num_replicas": args.replicas,
        "max_ongoing_requests": 16,
        "ray_actor_options": {"num_cpus": 0.5},
        "request_router_config": {"request_router_class": router},
    }
    deploy_flux(lora_root, model, options, "affinity", args)
    requests = failures = 0
    try:
        with httpx.Client(base_url=url, timeout=300) as client, ThreadPoolExecutor(64) as pool:
            client.post("/flux", json=BODY).raise_for_status()  # warm-up, without adapter
            client.post("/flux", json=BODY).raise_for_status()
            for round_index in range(args.rounds):
                batch = names[round_index * args.adapters : (round_index + 1) * args.adapters]
                bodies = [
                    {**BODY, "lora_name": n, "seed": i} for n in batch for i in range(args.burst)
                ]
                responses = list(
                    pool.map(lambda body: client.post("/flux-lora", json=body), bodies)
                )
                requests += len(responses)
                failures += sum(r.status_code != 200 for r in responses)
            loads = settled_loads(url)
    finally:
        serve.delete("affinity")
    distinct = args.rounds * args.adapters
    return {
        "requests": requests,
        "adapters": distinct,
        "loads": sum(loads),
        "loads_per_replica": loads,
        "loads_per_adapter": sum(loads) / distinct,
        "failures": failures,
    }


def settled_loads(url: str) -> list[int]:
    """The replicas' load counters once two reads a second apart agree (each replica reports
    them asynchronously)."""
    from loadtest import service

    previous = None
    while True:
        loads = [r["adapter_loads"] for r in service.replica_states(url)["flux"]]
        if loads == previous:
            return loads
        previous = loads
        time.sleep(1.0)


if __name__ == "__main__":
    main()
