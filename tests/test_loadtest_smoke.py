"""Smoke of the benchmark and the Locust run: each starts its own Ray cluster and Serve on
127.0.0.1 in a subprocess (so the session cluster is untouched), both at once: on the 2-core
development machine, 183 s in the full suite and 149 s alone (one after the other took 168 s;
alone, `bench --quick` took 98 s and the Locust run 59 s; most of it is starting Ray, Serve and
the replicas). Checks that the reports are written, no request failed and the files they
wrote are gone; the figures themselves are not checked here (timings belong to `make bench`,
not to tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Trains, or starts services of its own: left out of `make test-fast`.
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent

TIMEOUT_S = 240


def _start(args: list[str], log, scratch: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    # Their temporary folders in `scratch`, to see that they go; Ray's where they always are.
    env["RAY_TMPDIR"] = os.environ.get("RAY_TMPDIR", tempfile.gettempdir())
    env["TMPDIR"] = str(scratch)
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so a timeout can end all of it
    )


def _wait(process: subprocess.Popen, log_path) -> None:
    try:
        rc = process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"timed out; log: {log_path.read_text()[-3000:]}") from None
    assert rc == 0, f"exit code {rc}; log: {log_path.read_text()[-3000:]}"


def test_bench_and_locust_write_reports_without_failures(tmp_path):
    bench_out, locust_out = tmp_path / "bench", tmp_path / "locust"
    bench_log, locust_log = tmp_path / "bench.log", tmp_path / "locust.log"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with bench_log.open("w") as b, locust_log.open("w") as lo:
        bench = _start(["loadtest.bench", "--quick", "--out", str(bench_out)], b, scratch)
        locust = _start(
            [
                "loadtest.run_locust",
                "--config",
                str(REPO_ROOT / "cluster/local.yaml"),
                "--models",
                "flux",
                "--adapters",
                "4",
                "--users",
                "2",
                "--spawn-rate",
                "2",
                "--run-time",
                "10s",
                "--out",
                str(locust_out),
            ],
            lo,
            scratch,
        )
        try:
            _wait(bench, bench_log)
            _wait(locust, locust_log)
        finally:
            for process in (bench, locust):
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()

    report = json.loads((bench_out / "bench.json").read_text())
    assert (bench_out / "bench.md").read_text().count("\n| ") >= 7
    assert report["details"]["http"]["failed_requests"] == 0
    assert set(report["figures"]) >= {
        "adapter_over_base",
        "switch_over_repeat",
        "cold_load_over_read",
        "cold_load_fresh_over_read",
        "loraplex_over_naive_throughput",
        "http_over_in_process",
        "loads_per_distinct_adapter",
        "rss_after_swaps_over_warmup",
    }
    assert all(entry["ratio"] > 0 for entry in report["figures"].values())

    summary = json.loads((locust_out / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == 0
    assert summary["deployments"]["flux"]["adapter_loads_per_replica"]
    assert summary["deployments"]["flux"]["adapter_file_reads_per_replica"]
    loads = summary["deployments"]["flux"]["adapter_loads_per_replica"]
    fresh = summary["deployments"]["flux"]["adapter_fresh_loads_per_replica"]
    assert fresh.keys() == loads.keys() and all(fresh[r] <= loads[r] for r in loads)
    busy = summary["deployments"]["flux"]["busy_share_per_replica"].values()
    assert busy and all(0 < share <= 1 for share in busy)  # one tensor thread per replica
    for name in ("locust_stats.csv", "locust.html", "summary.md"):
        assert (locust_out / name).stat().st_size > 0
    # The model and adapters they wrote went with them.
    assert [p.name for p in scratch.iterdir() if p.name.startswith("loraplex-")] == []


def test_the_gpu_script_runs_small_on_a_cpu(tmp_path, monkeypatch):
    # Its real run needs a GPU, which CI never has; this keeps the script from rotting between
    # the sessions that have one. In this process: no Ray.
    from loadtest import gpu_adapters

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    report = gpu_adapters.main(
        ["--small", "--device", "cpu", "--steps", "1", "--repeats", "1", "--swaps", "4"]
        + ["--zipf-adapters", "6", "--zipf-requests", "4", "--out", str(tmp_path)]
    )
    written = json.loads((tmp_path / "gpu_adapters.json").read_text())
    assert written["figures"].keys() == report["figures"].keys()
    assert "replica_over_naive_throughput" in report["figures"]
    assert report["details"]["zipf"]["requests"] == 4
    # Its adapters went with it.
    assert [p.name for p in scratch.iterdir() if p.name.startswith("loraplex-")] == []
