"""gRPC server options shared by the coordinator, node daemons and executors."""

from __future__ import annotations


def test_a_second_server_on_a_busy_port_fails() -> None:
    """gRPC would share the port (SO_REUSEPORT) and split connections between two servers; ours refuse."""
    from concurrent import futures

    import grpc

    from node.stream import SERVER_OPTIONS

    first = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=SERVER_OPTIONS)
    port = first.add_insecure_port("127.0.0.1:0")
    first.start()
    try:
        second = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=SERVER_OPTIONS)
        try:
            bound = second.add_insecure_port(f"127.0.0.1:{port}")
        except RuntimeError:
            bound = 0
        assert bound == 0
    finally:
        first.stop(None)
