"""Ray Serve settings loraplex refuses at start-up, in the replica that would suffer them.

Ray 2.56+ has a "throughput optimized" mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1` on every node)
that, among other things, sends requests between replicas over gRPC instead of as Ray actor
calls (`RAY_SERVE_USE_GRPC_BY_DEFAULT`). Under that gRPC data plane, in Ray 2.60:
  - a message over `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH` (4 MB by default) fails: an
    8.6 MB PNG answered 500, and so would a Wan video, a large edit input or a LoRA upload
    checked by a model replica;
  - adapter affinity is lost: tests/test_adapter_routing.py's burst test sent requests for
    adapters already hot on one replica to the other one, which loaded them again.
Both were seen with Serve's own settings and loraplex's tests, not guessed. So the ingress, the
one caller of the model deployments, refuses to start under it, with a message that says how to
keep the mode's other parts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from deployments.errors import UnsupportedServeSetting


def grpc_data_plane_on(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether Serve's handles in a process with this environment send requests over gRPC.
    Read as Ray 2.60 reads it (`ray/serve/_private/constants.py`): Serve exposes no public
    setting for it, so the environment variables are read here rather than its private module:
    on with RAY_SERVE_USE_GRPC_BY_DEFAULT=1, or with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 unless
    RAY_SERVE_USE_GRPC_BY_DEFAULT says otherwise."""
    explicit = environ.get("RAY_SERVE_USE_GRPC_BY_DEFAULT")
    if environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0") == "1":
        return (explicit or "1") == "1"
    return explicit == "1"


def check_serve_settings(grpc_on: bool | None = None) -> None:
    """Raise UnsupportedServeSetting if Serve runs a setting loraplex cannot serve under."""
    if grpc_on is None:
        grpc_on = grpc_data_plane_on()
    if grpc_on:
        raise UnsupportedServeSetting(
            "Ray Serve's gRPC data plane is on (RAY_SERVE_USE_GRPC_BY_DEFAULT=1, or "
            "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 without RAY_SERVE_USE_GRPC_BY_DEFAULT=0): "
            "under it, responses and uploads over RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH "
            "(4 MB by default) fail, and requests stop following their hot adapters. Set "
            "RAY_SERVE_USE_GRPC_BY_DEFAULT=0 on the cluster's nodes."
        )
