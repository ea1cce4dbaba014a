"""A burst for a hot adapter: how the requests split between its replica and another.

    python -m loadtest.spread [--trials 8 --burst 12 --steps 48 --ingress-replicas 1]

Deploys the tiny Flux model on 2 replicas, on a Ray cluster of its own at 127.0.0.1, once per
router (Serve's default, and loraplex's). Each trial makes a new adapter hot on one replica (one
request), then sends `--burst` requests for it all at once, each a generation long enough
(`--steps` at 512x512) that the burst is in flight together. The replicas' own counters give
how many of the burst each served. With loraplex's router and the default spread_queue_gap of 4,
a burst of 12 should split 8 and 4: the holder takes requests until it has 4 more in flight than
the other replica. Prints a table, and writes it as JSON with `--out`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loadtest.affinity import MODEL, deploy_flux, per_router, write_results

BODY = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--burst", type=int, default=12, help="concurrent requests per trial")
    parser.add_argument("--steps", type=int, default=48, help="steps of each burst request")
    parser.add_argument(
        "--ingress-replicas", type=int, default=1, help="each has a router of its own"
    )
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from loadtest.run_locust import ADAPTER_PATTERN, write_adapters

    names = [ADAPTER_PATTERN.format(family="flux", index=i) for i in range(args.trials)]
    with tempfile.TemporaryDirectory(prefix="loraplex-spread-") as folder:
        write_adapters([MODEL], Path(folder), args.trials)
        results = per_router(measure, Path(folder), names, args, num_cpus=8)
    print("| router | trials | to the other replica, per trial | mean | spread | failures |")
    print("|---|---|---|---|---|---|")
    for label, row in results.items():
        print(
            f"| {label} | {args.trials} | {row['to_other']} | {row['to_other_mean']:.2f} | "
            f"{row['trials_spread']} | {row['failures']} |"
        )
    write_results(args, results)
    return results


def measure(url: str, lora_root: Path, names: list[str], router: str, args) -> dict:
    """Every trial's burst against a fresh deployment that uses `router`."""
    import httpx
    from ray import serve

    model = {**MODEL, "max_adapters_per_replica": len(names) + 1}
    options = {
        "num_replicas": 2,
        "max_ongoing_requests": 2 * args.burst,  # never full: the router alone decides
        "ray_actor_options": {"num_cpus": 0.25},
        "request_router_config": {"request_router_class": router},
    }
    deploy_flux(lora_root, model, options, "spread", args)
    to_other, failures = [], 0
    try:
        with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(64) as pool:
            long = {**BODY, "width": 512, "height": 512, "steps": args.steps}
            for name in names:
                client.post("/flux-lora", json={**BODY, "lora_name": name}).raise_for_status()
                time.sleep(1.0)  # the holder's report reaches the router
                before = served(url)
                bodies = [{**long, "lora_name": name, "seed": i} for i in range(args.burst)]
                responses = list(
                    pool.map(lambda body: client.post("/flux-lora", json=body), bodies)
                )
                failures += sum(r.status_code != 200 for r in responses)
                after = settled(url, sum(before.values()) + args.burst)
                split = sorted((after[r] - before.get(r, 0) for r in after), reverse=True)
                to_other.append(split[1] if len(split) > 1 else 0)
    finally:
        serve.delete("spread")
    return {
        "to_other": to_other,
        "to_other_mean": statistics.mean(to_other),
        "trials_spread": sum(n > 0 for n in to_other),
        "failures": failures,
    }


def served(url: str) -> dict[str, int]:
    """Requests with an adapter each replica has served, by replica id."""
    from loadtest import service

    return {
        r["replica_id"]: r["adapter_hits"] + r["adapter_loads"]
        for r in service.replica_states(url)["flux"]
    }


def settled(url: str, total: int) -> dict[str, int]:
    """`served` once the replicas' reports add up to `total` (they report asynchronously),
    or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        counts = served(url)
        if sum(counts.values()) >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


if __name__ == "__main__":
    main()
