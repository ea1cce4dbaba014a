"""cluster/grafana/loraplex.json: every query parses as PromQL and names only metrics the
service exports. Checked twice: against the metric declarations in loraplex's and Ray Serve's
code, named as Ray's Prometheus export names them, and against a real scrape of the head
node's metrics endpoint after requests and a training status report."""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path

import httpx
import promql_parser
import ray.serve
from prometheus_client.parser import text_string_to_metric_families

from cluster.train import metrics as train_metrics
from cluster.train.config import JOB_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = REPO_ROOT / "cluster" / "grafana" / "loraplex.json"
# Where loraplex declares Ray metrics (STYLE.md: next to what they measure).
LORAPLEX_METRIC_MODULES = [
    REPO_ROOT / "deployments" / "replica_metrics.py",
    REPO_ROOT / "cluster" / "train" / "metrics.py",
]
# Grafana's built-in variables, as a query would see them; the dashboard's own (application,
# deployment) stand for "All".
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
# Ray's export: `ray_` before every name, `_total` after a counter's, a histogram's three series.
EXPORTED_SUFFIXES = {
    "Counter": ["_total"],
    "Gauge": [""],
    "Histogram": ["_bucket", "_count", "_sum"],
}
SMALL = {"width": 64, "height": 64, "steps": 2}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    """Every panel, rows' collapsed panels included."""
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def with_variables(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: BUILTIN_VARIABLES.get(m.group(1), ".*"), expr)


def query_metrics(expr: str) -> set[str]:
    """The metric names a PromQL query selects (parsing it, so a syntax error fails here)."""
    names: list[str | None] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)

    promql_parser.walk(promql_parser.parse(with_variables(expr)), visit)
    assert None not in names, f"a selector without a metric name in {expr}"
    return set(names)  # type: ignore[arg-type]


def series_family(name: str) -> str:
    """The metric an exported series belongs to: `x` for `x_total`, `x_bucket`, `x_sum`."""
    return re.sub(r"_(total|bucket|count|sum)$", "", name)


def dashboard_metrics() -> set[str]:
    names = set()
    for panel in panels():
        for target in panel.get("targets", []):
            names |= query_metrics(target["expr"])
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            [metric] = re.findall(r"label_values\((\w+)", variable["definition"])
            names.add(metric)
    return names


def declared_patterns(paths: list[Path]) -> list[re.Pattern[str]]:
    """Exported-name patterns of every Counter/Gauge/Histogram(name, ...) in these files; an
    f-string's fields (Serve's `serve_num_{protocol}_requests`) match any name part."""
    patterns = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            kind = getattr(node.func, "attr", getattr(node.func, "id", None))
            name = next((k.value for k in node.keywords if k.arg == "name"), None)
            name = name or (node.args[0] if node.args else None)
            if kind not in EXPORTED_SUFFIXES or name is None:
                continue
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                body = re.escape(name.value)
            elif isinstance(name, ast.JoinedStr):
                body = "".join(
                    re.escape(part.value) if isinstance(part, ast.Constant) else "[a-z0-9_]+"
                    for part in name.values
                )
            else:
                continue
            patterns += [re.compile(f"ray_{body}{suffix}") for suffix in EXPORTED_SUFFIXES[kind]]
    return patterns


def test_dashboard_is_well_formed():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"


def test_dashboard_queries_only_declared_metrics():
    serve_code = [
        path for path in Path(ray.serve.__file__).parent.rglob("*.py") if "tests" not in path.parts
    ]
    patterns = declared_patterns(LORAPLEX_METRIC_MODULES + serve_code)
    undeclared = {
        name for name in dashboard_metrics() if not any(p.fullmatch(name) for p in patterns)
    }
    assert undeclared == set()
    # Every loraplex metric has a panel, but the count of reads one cold load shared with
    # others: a detail of cold loads that the file reads panel covers well enough.
    plotted = {series_family(name) for name in dashboard_metrics()}
    ours = {series_family(p.pattern) for p in declared_patterns(LORAPLEX_METRIC_MODULES)}
    unplotted = ours - plotted - {"ray_loraplex_adapter_file_reads_shared"}
    assert unplotted == set(), "give these metrics a panel in cluster/grafana/loraplex.json"


def test_train_metrics_read_the_base_model_once_written(tmp_path):
    run_dir = str(tmp_path / "train-0123")
    assert train_metrics.base_model(run_dir) == train_metrics.UNKNOWN_MODEL
    (tmp_path / "train-0123").mkdir()
    (tmp_path / "train-0123" / JOB_FILE).write_text(json.dumps({"base_model": "sdxl"}))
    assert train_metrics.base_model(run_dir) == "sdxl"


def exported_samples(metrics_url: str) -> list:
    text = httpx.get(metrics_url, timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def test_every_dashboard_metric_is_in_the_live_export(service, metrics_url, tmp_path):
    import ray

    # Requests that make each serving metric exist: a miss then a hit, loads past the
    # replicas' two slots (evictions), and an error response.
    def generate(lora_id: str) -> httpx.Response:
        body = {"prompt": "a red fox", "seed": 3, "lora_id": lora_id, **SMALL}
        return service.post("/flux-lora", json=body)

    generate("e")
    assert generate("e").headers["X-LoRA-Cache"] == "hit"
    for lora_id in ("f", "g", "h"):
        assert generate(lora_id).status_code == 200
    assert generate("no-such-adapter").status_code == 404

    # Training progress as rank 0 records it: progress.write_status in a Ray worker.
    run_dir = tmp_path / "train-grafana"
    run_dir.mkdir()
    (run_dir / JOB_FILE).write_text(json.dumps({"base_model": "flux"}))

    @ray.remote(num_cpus=0)
    class Rank0:
        def report(self, run: str) -> None:
            from cluster.train import progress
            from cluster.train.config import RunStatus

            status = RunStatus(state="RUNNING", step=7, total_steps=20, loss=0.25)
            progress.write_status(run, status)

    rank0 = Rank0.remote()
    ray.get(rank0.report.remote(str(run_dir)))
    try:
        # Only a compiled model renders eagerly, and the session's models are not compiled:
        # tests/test_compiled.py counts its eager fallbacks.
        wanted = dashboard_metrics() - {"ray_loraplex_eager_fallbacks_total"}
        deadline = time.monotonic() + 30  # workers report every second here (conftest.py)
        while True:
            samples = exported_samples(metrics_url)
            missing = wanted - {sample.name for sample in samples}
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert missing == set()
        steps = {
            (s.labels["job_id"], s.labels["base_model"]): s.value
            for s in samples
            if s.name == "ray_loraplex_train_step"
        }
        assert steps[("train-grafana", "flux")] == 7
    finally:
        ray.kill(rank0)
