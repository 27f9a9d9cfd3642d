"""tensorfleet client: the light, public package for talking to a cluster.

It imports neither torch nor the engine, so that applications can depend on it alone. Modules are
imported on use: ``client.api`` (``TensorfleetClient``: generate and status over gRPC),
``client.display`` (a StatusResponse as a dict or tables), ``client.tensors`` (numpy arrays <->
``tensorfleet.v1.Tensor``) and ``client.cli`` (the ``tensorfleet`` command). The names of
``client.api`` are also reachable here (``from client import TensorfleetClient``); importing
``client`` alone loads nothing else.
"""

from __future__ import annotations

from typing import Any

# The coordinator's default client-facing gRPC port (used by `coordinator start` and `tensorfleet`).
DEFAULT_COORDINATOR_PORT = 50051

_API_NAMES = frozenset({"ClientError", "Completion", "Delta", "TensorfleetClient", "format_status", "status_to_dict"})


def __getattr__(name: str) -> Any:
    # Lazy, so that `import client` (done by the coordinator and node CLIs for the port) stays free
    # of grpc.
    if name in _API_NAMES:
        from client import api

        return getattr(api, name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
