"""A persistent Stage.Forward stream to one downstream stage: send a step, read its result, in order.

Used by a stage leader to reach the next stage, and by the coordinator to reach stage 0.
"""

from __future__ import annotations

import queue
import threading

import grpc

from tensorfleet.v1 import node_pb2, node_pb2_grpc

# Activations of a long prefill are tens of MB; gRPC's default limit is 4 MB.
MAX_MESSAGE_BYTES = 512 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

_CLOSE = object()


class StageStream:
    def __init__(self, address: str, *, timeout_s: float = 600.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = node_pb2_grpc.StageStub(self._channel)
        self._requests: queue.Queue = queue.Queue()
        self._responses = self._stub.Forward(iter(self._next_request, _CLOSE))
        self._lock = threading.Lock()

    def _next_request(self):  # noqa: ANN202 - a StepMessage or the end marker
        return self._requests.get()

    def call(self, msg: node_pb2.StepMessage) -> node_pb2.StepResult:
        """Send one step and wait for its result (one step in flight per stream)."""
        with self._lock:
            self._requests.put(msg)
            result = next(self._responses)
        if result.step_id != msg.step_id:
            raise RuntimeError(f"stage at {self.address} answered step {result.step_id} to step {msg.step_id}")
        return result

    def close(self) -> None:
        self._requests.put(_CLOSE)
        self._responses.cancel()
        self._channel.close()
