"""The ingress refuses Ray Serve's gRPC data plane (serve/serve_settings.py), which its own
process reads from the environment: checked in Ray workers started with each setting."""

from __future__ import annotations

import pytest

from deployments.errors import UnsupportedServeSetting
from serve.serve_settings import check_serve_settings


def test_the_grpc_data_plane_is_refused_with_the_setting_named():
    with pytest.raises(UnsupportedServeSetting) as raised:
        check_serve_settings(grpc_on=True)
    assert "RAY_SERVE_USE_GRPC_BY_DEFAULT=0" in raised.value.message
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" in raised.value.message
    check_serve_settings(grpc_on=False)


@pytest.mark.parametrize(
    ("env_vars", "grpc_on"),
    [
        ({}, False),
        ({"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}, True),
        ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, True),
        ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}, False),
    ],
)
def test_a_ray_worker_reads_the_data_plane_from_its_environment(ray_cluster, env_vars, grpc_on):
    """As a replica would: Serve's settings come from the worker's environment at import."""
    import ray

    from serve.serve_settings import grpc_data_plane_on

    @ray.remote(num_cpus=0)
    def in_worker() -> bool:
        return grpc_data_plane_on()

    worker = in_worker.options(runtime_env={"env_vars": env_vars}) if env_vars else in_worker
    assert ray.get(worker.remote(), timeout=120) is grpc_on


def test_the_ingress_checks_before_it_starts(monkeypatch):
    """The ingress replica runs the check first in its constructor: nothing else is built."""
    from serve import serve_settings
    from serve.ingress import Ingress

    monkeypatch.setattr(serve_settings, "grpc_data_plane_on", lambda: True)
    # Serve's ingress wrapper subclasses the class we wrote; its constructor is that class's.
    wrapper = Ingress.func_or_class
    written = wrapper.__mro__[1]
    with pytest.raises(UnsupportedServeSetting):
        written.__init__(object.__new__(wrapper), {}, {})
