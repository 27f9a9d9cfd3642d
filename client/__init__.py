"""tensorfleet client: the light, public package for talking to a cluster.

It imports neither torch nor the engine, so that applications can depend on it alone. Modules are
imported on use: ``client.tensors`` (numpy arrays <-> ``tensorfleet.v1.Tensor``) and ``client.cli``
(the ``tensorfleet`` command).
"""

# The coordinator's default client-facing gRPC port (used by `coordinator start` and `tensorfleet`).
DEFAULT_COORDINATOR_PORT = 50051
