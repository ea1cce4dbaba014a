"""Training's job client under Ray's token authentication (RAY_AUTH_MODE=token), as
docs/cluster.md describes it: the ingress, a Ray worker, sends its node's token by itself; a
process without the token gets a clear 503 error, not a 500.

The cluster runs in a child process started with the token in its environment, so this
session's own cluster and environment stay as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # a Ray cluster of its own

SCRIPT = r"""
import json, os, socket, subprocess, sys
import ray
from ray.cluster_utils import Cluster

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

CHECK = '''
import json, sys
from deployments.errors import JobServerUnavailable
from serve.config import AppConfig
from serve.training import TrainingJobs
config = AppConfig.model_validate(
    {"models": [{"name": "flux", "family": "flux"}], "job_submission_url": sys.argv[1]})
try:
    print(json.dumps({"jobs": TrainingJobs(config).list()}))
except JobServerUnavailable as e:
    print(json.dumps({"code": e.code, "message": e.message}))
'''

@ray.remote(num_cpus=0)
def in_a_worker():
    from serve.config import AppConfig
    from serve.training import TrainingJobs
    config = AppConfig.model_validate({"models": [{"name": "flux", "family": "flux"}]})
    return TrainingJobs(config).list()

dashboard_port = free_port()
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
    "dashboard_port": dashboard_port, "dashboard_agent_listen_port": free_port(),
    "object_store_memory": 100 * 1024**2})
try:
    ray.init(address=cluster.address, log_to_driver=False)
    url = f"http://127.0.0.1:{dashboard_port}"
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    outside = subprocess.run([sys.executable, "-c", CHECK, url], env=plain,
                             capture_output=True, text=True, timeout=120)
    print(json.dumps({"worker": ray.get(in_a_worker.remote()),
                      "outside": json.loads(outside.stdout.strip().splitlines()[-1])}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_post_train_reaches_a_token_protected_job_server():
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["worker"] == []  # the job server answered the worker: no training jobs yet
    assert seen["outside"]["code"] == "job_server_unavailable"
    assert "refused this node's Ray token" in seen["outside"]["message"]
