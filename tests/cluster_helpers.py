"""A multi-node Ray cluster on this machine, shaped like a production one, for tests that need
several nodes (placement by GPU share, losing a node, training on its own node type).

    with multinode_cluster() as cluster:
        cluster.url                       # Serve's HTTP proxy, on the head
        cluster.node_id(cluster.a100)     # the training node, for NodeAffinity or assertions
        node = cluster.add_serving_node() # another num_gpus=2 node; cluster.remove(node)

Nodes, each a real raylet started by Ray's own `ray.cluster_utils.Cluster`:
- the head: CPUs only (num_gpus=0). It runs Serve's controller and proxy, and whatever asks for
  `HEAD_RESOURCE` (the ingress, in these tests);
- serving nodes: `num_gpus=2` logical GPUs (this machine has no CUDA: a replica sees its GPU ids
  in CUDA_VISIBLE_DEVICES and `ray.get_gpu_ids()`, torch finds no device and `device: auto`
  falls back to the CPU);
- an "A100" node: `accelerator_type:A100` and a few CPUs, no GPU resource, so nothing that asks
  for a GPU lands there; training asks for the accelerator resource.
Each node also carries a `ROLE_LABEL` label (head, serving, training); scheduling here goes by
resources only, the label is for reading placements (`ray.util.state.list_nodes`).

One process talks to one Ray cluster at a time, and the session's `ray_cluster` fixture
(tests/conftest.py) may already be connected when a module using this helper runs (pytest runs
modules in file order, and any earlier module may have started it). The helper therefore
disconnects this process from it (`ray.shutdown()` only drops the driver: the session
cluster's nodes, its Serve controller and its apps are detached and keep serving), connects to
its own cluster, and at the end reconnects to the session cluster with the same runtime_env.
Serve's client notices the new driver session by its job id and finds the controller again
(ray/serve/context.py, `_cached_client_from_current_session`), so the session's later tests
deploy and delete apps as before. What the session driver owned itself (non-detached actors,
objects it put) would die with its connection; the session's fixtures own none (handles and
stores only), which is what makes this safe. The alternative, a subprocess per module, keeps
the two apart entirely but turns each test into a relay of another pytest's output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass, field

# Serve's proxy and the dashboard listen here. Ray's own processes (GCS, raylets, workers) use
# the machine's address, as the session cluster's do: Ray 2.60's `ray.init` turns 127.0.0.1 in
# a cluster address into that address (services.resolve_ip_for_localhost), so a driver cannot
# join a GCS that listens on 127.0.0.1 alone.
LOCALHOST = "127.0.0.1"
ROLE_LABEL = "loraplex.io/role"
HEAD_RESOURCE = "head"  # the head's custom resource (100 of it): ask for 1 to run there
A100_RESOURCE = "accelerator_type:A100"
ENV_PASSED = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "MKL_CBWR")
# Logical CPUs: the tiny replicas take one each on a serving node, the ingress a quarter on the
# head, a 2-worker training job one per worker on the A100 node.
HEAD_CPUS = 4
SERVING_CPUS = 8
SERVING_GPUS = 2
A100_CPUS = 4
OBJECT_STORE_BYTES = 200 * 1024**2
# The GCS declares a node dead after this many missed health checks of this period; Ray's
# defaults (5 x 3 s) leave a killed node's replicas "unavailable", not dead, for ~15 s.
HEALTH_CHECK_PERIOD_MS = 1000
HEALTH_CHECK_FAILURES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MultiNodeCluster:
    """A running cluster: `cluster` is Ray's `Cluster`; the node lists hold Ray's node objects
    (`ray._private.node.Node`, what `Cluster.add_node` returns and `remove_node` takes)."""

    cluster: object
    url: str
    dashboard_url: str
    head: object
    serving: list = field(default_factory=list)
    training: list = field(default_factory=list)

    @property
    def address(self) -> str:
        """The GCS address: for `ray.init`, and `ray.util.state`'s `address` (pass it: with
        other Ray clusters on the machine, the state API's own lookup may pick another)."""
        return self.cluster.address

    @property
    def a100(self):
        """The first A100 (training) node."""
        return self.training[0]

    @staticmethod
    def node_id(node) -> str:
        """Ray's hex node id, as `ray.util.state` and `NodeAffinitySchedulingStrategy` take it."""
        return node.node_id

    def role_of(self, node_id: str) -> str:
        """head, serving, training, or "removed" for a node no longer in the cluster."""
        for role, nodes in (
            ("head", [self.head]),
            ("serving", self.serving),
            ("training", self.training),
        ):
            if any(node.node_id == node_id for node in nodes):
                return role
        return "removed"

    def add_serving_node(self, num_gpus: int = SERVING_GPUS, num_cpus: int = SERVING_CPUS):
        node = self.cluster.add_node(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            object_store_memory=OBJECT_STORE_BYTES,
            labels={ROLE_LABEL: "serving"},
        )
        self.serving.append(node)
        return node

    def add_a100_node(self, num_cpus: int = A100_CPUS, num_gpus: int = 0):
        node = self.cluster.add_node(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources={A100_RESOURCE: 1},
            object_store_memory=OBJECT_STORE_BYTES,
            labels={ROLE_LABEL: "training", "accelerator": "A100"},
        )
        self.training.append(node)
        return node

    def remove(self, node, graceful: bool = False) -> None:
        """Take a node away. Not graceful by default: as when its machine is lost, its workers
        (the replicas) and its raylet are killed at once, and the GCS finds it dead by its
        missed health checks. (`Cluster.remove_node` alone kills the raylet; its workers notice
        only after a while, and meanwhile answer requests.)"""
        if not graceful:
            from ray.util.state import list_workers

            workers = list_workers(
                address=self.address, filters=[("node_id", "=", node.node_id)], limit=1000
            )
            for worker in workers:
                if worker.is_alive and worker.worker_type == "WORKER":
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=graceful)
        for nodes in (self.serving, self.training):
            if node in nodes:
                nodes.remove(node)


def _driver_env() -> dict:
    return {"env_vars": {name: os.environ[name] for name in ENV_PASSED if name in os.environ}}


@contextlib.contextmanager
def _own_driver():
    """Leave the Ray cluster this process is connected to, if any, for the block; reconnect to it
    afterwards (see the module docstring)."""
    import ray

    previous = None
    if ray.is_initialized():
        context = ray.get_runtime_context()
        previous = (context.gcs_address, context.runtime_env or None, context.namespace)
        ray.shutdown()
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if previous is not None:
            address, runtime_env, namespace = previous
            ray.init(
                address=address,
                runtime_env=runtime_env,
                namespace=namespace,
                log_to_driver=False,
            )


@contextlib.contextmanager
def multinode_cluster(serving_nodes: int = 1, a100_nodes: int = 1):
    """A head, `serving_nodes` serving nodes and `a100_nodes` A100 nodes; this process
    connected to it and Serve's proxy started on the head at a free port (`proxy_location:
    HeadOnly`: clients come in through the head). Everything is shut down at the end."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    with _own_driver():
        dashboard_port = free_port()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": HEAD_CPUS,
                "num_gpus": 0,
                "resources": {HEAD_RESOURCE: 100},
                "labels": {ROLE_LABEL: "head"},
                "object_store_memory": OBJECT_STORE_BYTES,
                # The dashboard hosts Ray's job server, which training jobs are submitted to;
                # its own port and its agent's, free ones (see tests/conftest.py).
                "include_dashboard": True,
                "dashboard_host": LOCALHOST,
                "dashboard_port": dashboard_port,
                "dashboard_agent_listen_port": free_port(),
                "_system_config": {
                    "metrics_report_interval_ms": 1000,
                    "health_check_period_ms": HEALTH_CHECK_PERIOD_MS,
                    "health_check_failure_threshold": HEALTH_CHECK_FAILURES,
                },
            },
        )
        try:
            running = MultiNodeCluster(
                cluster=cluster,
                url="",
                dashboard_url=f"http://{LOCALHOST}:{dashboard_port}",
                head=cluster.head_node,
            )
            for _ in range(serving_nodes):
                running.add_serving_node()
            for _ in range(a100_nodes):
                running.add_a100_node()
            cluster.wait_for_nodes()
            ray.init(
                address=cluster.address,
                log_to_driver=False,
                runtime_env=_driver_env(),
            )
            port = free_port()
            serve.start(
                proxy_location="HeadOnly",
                http_options={"host": LOCALHOST, "port": port},
            )
            running.url = f"http://{LOCALHOST}:{port}"
            yield running
        finally:
            if ray.is_initialized():
                with contextlib.suppress(Exception):
                    serve.shutdown()
                ray.shutdown()
            cluster.shutdown()


def wait_for(read, ready, timeout_s: float = 60.0, every_s: float = 0.2):
    """`read()` once `ready(value)` holds, or the last value after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not ready(value := read()) and time.monotonic() < deadline:
        time.sleep(every_s)
    return value
