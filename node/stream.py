"""A persistent Stage.Forward stream to one downstream stage.

Steps may be in flight several at a time (pipeline micro-batches): ``submit`` returns a future, results
come back in the order the steps were sent, and a receiver thread resolves the futures. Used by a stage
leader to reach the next stage, and by the coordinator to reach stage 0.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future

import grpc

from tensorfleet.v1 import node_pb2, node_pb2_grpc


def split_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets: [::1]:50051) as (host, port), brackets removed; ValueError that
    says what is wrong otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or host == "[]":
        raise ValueError(f"{text!r} is not HOST:PORT (for example 10.0.0.5:50051)")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{text!r}: put an IPv6 host in brackets, e.g. [::1]:50051")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number in 1..65535")
    return host.removeprefix("[").removesuffix("]"), int(port)

# Activations of a long prefill are tens of MB; gRPC's default limit is 4 MB.
MAX_MESSAGE_BYTES = 512 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# gRPC servers reuse ports by default (SO_REUSEPORT): a second server on a busy port would start and
# share its connections with the first. Ours must fail instead.
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
# Control-plane servers (coordinator, node daemon) receive small messages only; big ones go out (weights).
CONTROL_MAX_RECEIVE_BYTES = 4 << 20
CONTROL_SERVER_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                          ("grpc.max_receive_message_length", CONTROL_MAX_RECEIVE_BYTES), ("grpc.so_reuseport", 0)]

_CLOSE = object()


class StreamClosed(RuntimeError):
    """The stream ended (the stage went away or the stream was closed) with steps still in flight."""


class StageStream:
    def __init__(self, address: str, *, secret: str | None = None, tls_dir: str | None = None,
                 timeout_s: float = 600.0) -> None:
        """``secret``: the epoch's data key, sent with the stream; ``tls_dir``: the cluster's certificates
        (node/security.py)."""
        from node.security import bearer, open_channel

        self.address = address
        self.timeout_s = timeout_s
        self._channel = open_channel(address, tls_dir, options=CHANNEL_OPTIONS)
        self._metadata = bearer(secret)
        self._requests: queue.Queue = queue.Queue()
        self._stub = node_pb2_grpc.StageStub(self._channel)
        self._responses = self._stub.Forward(iter(self._requests.get, _CLOSE), metadata=self._metadata)
        self._pending: deque[tuple[int, Future]] = deque()
        self._lock = threading.Lock()
        self._closed: Exception | None = None
        threading.Thread(target=self._receive, name=f"stream-{address}", daemon=True).start()

    def submit(self, msg: node_pb2.StepMessage) -> Future:
        """Send one step; the future resolves to its StepResult (or StreamClosed)."""
        fut: Future = Future()
        with self._lock:
            if self._closed is not None:
                fut.set_exception(StreamClosed(f"stream to {self.address} is closed: {self._closed}"))
                return fut
            self._pending.append((msg.step_id, fut))
            self._requests.put(msg)
        return fut

    def call(self, msg: node_pb2.StepMessage) -> node_pb2.StepResult:
        """Send one step and wait for its result."""
        return self.submit(msg).result(timeout=self.timeout_s)

    def share(self, request: node_pb2.ShareRequest, *, timeout_s: float = 30.0) -> node_pb2.ShareResponse:
        """Offer the stage a shared ring (Stage.Share) on this stream's channel."""
        return self._stub.Share(request, metadata=self._metadata, timeout=timeout_s)

    def _receive(self) -> None:
        error: Exception = StreamClosed(f"the stage at {self.address} ended the stream")
        try:
            for result in self._responses:
                with self._lock:
                    step_id, fut = self._pending.popleft()
                if result.step_id != step_id:
                    fut.set_exception(RuntimeError(f"stage at {self.address} answered step {result.step_id} "
                                                   f"to step {step_id}"))
                else:
                    fut.set_result(result)
        except grpc.RpcError as e:
            error = StreamClosed(f"the stream to {self.address} failed: {e.code().name}: {e.details()}")
        with self._lock:
            self._closed = error
            pending, self._pending = list(self._pending), deque()
        for _, fut in pending:
            fut.set_exception(error)

    def close(self) -> None:
        self._requests.put(_CLOSE)
        self._responses.cancel()
        self._channel.close()
