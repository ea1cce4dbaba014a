"""Where an HTTP generation's time goes, hop by hop, from Serve's own request logs.

Serve logs every request once in each process it passes, with its request id and the time that
process spent on it: the proxy (`proxy_<ip>.log`: `POST /{endpoint} 200 262.1ms`), the
ingress replica (`replica_<app>_Ingress_<id>.log`, the same line) and the model replica
(`replica_<app>_<model>_<id>.log`: `CALL generate OK 193.8ms`). A client that sends its own
`X-Request-Id` (Serve keeps it) finds its request in all three; with the replica's
`X-Inference-Ms` (its pipeline call) and the client's own clock, the differences are the hops.
"""

from __future__ import annotations

import re
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# "... <request id> -- <what> <ms>ms": the last line Serve logs for a request in a process.
_LINE = re.compile(r" (?P<id>[0-9a-f]{8}-[0-9a-f-]{27}) -- (?P<what>.*) (?P<ms>[0-9.]+)ms$")
HOPS = (
    ("client_ms", "HTTP round trip, at the client"),
    ("proxy_ms", "in Serve's proxy (its request log)"),
    ("ingress_ms", "in the ingress replica (its request log)"),
    ("replica_ms", "in the model replica's `generate` (its request log)"),
    ("pipeline_ms", "the replica's pipeline call (X-Inference-Ms)"),
)


def new_request_id() -> str:
    return str(uuid.uuid4())


def serve_logs_dir() -> Path:
    """The Serve log folder of the Ray cluster this process is connected to (not
    /tmp/ray/session_latest, which may be another cluster's on a shared machine)."""
    import ray

    # Connected already: ray.init returns the running cluster's context (its session folder).
    context = ray.init(ignore_reinit_error=True, logging_level="ERROR")
    return Path(context.address_info["session_dir"]) / "logs" / "serve"


def _process_of(log_name: str, app: str, model: str) -> str | None:
    if log_name.startswith("proxy_"):
        return "proxy_ms"
    if log_name.startswith(f"replica_{app}_Ingress_"):
        return "ingress_ms"
    if log_name.startswith(f"replica_{app}_{model}_"):
        return "replica_ms"
    return None


def logged_ms(
    logs_dir: Path, request_ids: list[str], app: str, model: str, wait_s: float = 10.0
) -> dict[str, dict[str, float]]:
    """{request id: {"proxy_ms", "ingress_ms", "replica_ms"}} for `request_ids`, as the
    processes of `app` (its `model` deployment) logged them; waits up to `wait_s` for lines
    not written yet. A request missing from a log has no entry for that process."""
    wanted = set(request_ids)
    found: dict[str, dict[str, float]] = {rid: {} for rid in request_ids}
    deadline = time.monotonic() + wait_s
    while True:
        for path in logs_dir.glob("*.log"):
            process = _process_of(path.name, app, model)
            if process is None:
                continue
            for line in path.read_text(errors="replace").splitlines():
                match = _LINE.search(line)
                if match and match["id"] in wanted:
                    found[match["id"]][process] = float(match["ms"])
        if all(len(entry) == 3 for entry in found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def cluster_cpu_s() -> dict[str, float]:
    """CPU seconds so far of each process of the local Ray cluster this process started (its
    descendants: GCS, raylet, and the workers, named by their process title such as
    `ray::ProxyActor` or `ray::ServeReplica:<app>:<deployment>`), same names summed."""
    import psutil

    totals: dict[str, float] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            with process.oneshot():
                command = process.cmdline()
                times = process.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        name = command[0].split()[0] if command else process.name()
        name = Path(name).name if name.startswith("/") else name
        totals[name] = totals.get(name, 0.0) + times.user + times.system
    return totals


def hop_rows(samples: list[dict[str, float]], in_process: dict[str, float]) -> list[tuple]:
    """(hop, median ms) rows: each process's time, and what lies between two of them.
    `samples`: per request, the HOPS keys; `in_process`: medians of "pipeline_ms" and
    "encode_ms" measured in the client's process beside the requests."""
    complete = [s for s in samples if all(key in s for key, _ in HOPS)]
    if not complete:
        return []

    def median(key) -> float:
        return statistics.median(key(s) for s in complete)

    local = in_process["pipeline_ms"] + in_process["encode_ms"]
    rows = [(label, median(lambda s, k=key: s[k])) for key, label in HOPS]
    rows += [
        ("in process: pipeline call", in_process["pipeline_ms"]),
        ("in process: PNG encoding", in_process["encode_ms"]),
        # Not client - proxy: the proxy logs a request once the ingress's call has ended,
        # after the response's last bytes went out.
        (
            "hop: client <-> ingress (HTTP on 127.0.0.1, Serve's proxy, its call to the "
            "ingress, the ASGI messages back)",
            median(lambda s: s["client_ms"] - s["ingress_ms"]),
        ),
        (
            "hop: the ingress's own work and its call to the model replica",
            median(lambda s: s["ingress_ms"] - s["replica_ms"]),
        ),
        (
            "hop: the model replica beyond its pipeline call (encoding included)",
            median(lambda s: s["replica_ms"] - s["pipeline_ms"]),
        ),
        (
            "pipeline call in the replica - in process",
            median(lambda s: s["pipeline_ms"]) - in_process["pipeline_ms"],
        ),
        (
            "HTTP round trip - in process (pipeline and encoding)",
            median(lambda s: s["client_ms"]) - local,
        ),
    ]
    return [(label, round(ms, 1)) for label, ms in rows]


@dataclass
class HttpRounds:
    """HTTP requests alternating with the same generation in the client's process."""

    samples: list[dict[str, float]] = field(default_factory=list)
    """Per request: client_ms, pipeline_ms (X-Inference-Ms), then what Serve logged."""
    pipeline_ms: list[float] = field(default_factory=list)
    """In process: the pipeline call."""
    encode_ms: list[float] = field(default_factory=list)
    """In process: the image's encoding."""
    same_bytes: bool = True
    """Whether every HTTP answer was the in-process image's bytes."""
    cluster_cpu_ms: dict[str, float] = field(default_factory=dict)
    """CPU ms per round (one request and one generation here) of each process of the local
    Ray cluster: where the machine's cores went besides this process."""

    def http_ms(self) -> float:
        return statistics.median(s["client_ms"] for s in self.samples)

    def in_process_ms(self) -> float:
        """The median of pipeline call and encoding together, request by request."""
        return statistics.median(map(sum, zip(self.pipeline_ms, self.encode_ms, strict=True)))

    def hops(self) -> list[tuple]:
        medians = {
            "pipeline_ms": statistics.median(self.pipeline_ms),
            "encode_ms": statistics.median(self.encode_ms),
        }
        return hop_rows(self.samples, medians)


def alternate(
    client, path: str, body: dict, rounds: int, generate, encode, logs: tuple[Path, str, str]
) -> HttpRounds:
    """`rounds` times: `body` posted to `path`, then `generate()` and `encode(image)` here
    (each timed). `logs`: Serve's log folder, the app and the model deployment, for the hops."""
    measured = HttpRounds()
    ids = []
    cpu_before = cluster_cpu_s()
    for _ in range(rounds):
        request_id = new_request_id()
        started = time.perf_counter()
        response = client.post(path, json=body, headers={"X-Request-Id": request_id})
        client_ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"{path}: {response.status_code} {response.text}")
        ids.append(request_id)
        pipeline_ms = float(response.headers["X-Inference-Ms"])
        measured.samples.append({"client_ms": client_ms, "pipeline_ms": pipeline_ms})
        started = time.perf_counter()
        image = generate()
        generated = time.perf_counter()
        content = encode(image)
        measured.pipeline_ms.append((generated - started) * 1000)
        measured.encode_ms.append((time.perf_counter() - generated) * 1000)
        measured.same_bytes &= response.content == content
    cpu_after = cluster_cpu_s()
    spent = {name: s - cpu_before.get(name, 0.0) for name, s in cpu_after.items()}
    measured.cluster_cpu_ms = {
        name: round(seconds * 1000 / rounds, 1)
        for name, seconds in sorted(spent.items(), key=lambda item: -item[1])
        if seconds > 0
    }
    logs_dir, app, model = logs
    logged = logged_ms(logs_dir, ids, app, model)
    for sample, request_id in zip(measured.samples, ids, strict=True):
        sample.update(logged[request_id])
    return measured


def markdown(rows: list[tuple], title: str) -> str:
    lines = [f"| {title} | ms |", "|---|---|"]
    lines += [f"| {label} | {ms:.1f} |" for label, ms in rows]
    return "\n".join(lines)
