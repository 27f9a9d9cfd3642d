"""A fake coordinator in an in-process gRPC server on 127.0.0.1:0, for the client library and CLI tests.

The ``fake_coordinator`` fixture yields the servicer, started; tests adjust what it does through its
attributes (``responses``, ``endless``, ``abort_with``, ``status_response``) and read back what it
received (``requests``, ``contexts``) and saw (``rpc_done``: set when the Generate RPC ended,
including by cancellation).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from tensorfleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

GIB = 1 << 30


def canned_responses(request_id: str) -> list[coordinator_pb2.GenerateResponse]:
    """ "Hello, world!" in three chunks of 5 tokens in all, then the last message (stop, usage)."""
    chunks = [("Hello", [101, 102]), (", ", [103]), ("world!", [104, 105])]
    out = [coordinator_pb2.GenerateResponse(request_id=request_id, token_ids=ids, text_delta=t) for t, ids in chunks]
    out.append(
        coordinator_pb2.GenerateResponse(
            request_id=request_id,
            finish_reason=coordinator_pb2.FINISH_REASON_STOP,
            usage=coordinator_pb2.Usage(prompt_tokens=3, completion_tokens=5),
        )
    )
    return out


def canned_status() -> coordinator_pb2.StatusResponse:
    h100 = "NVIDIA H100 80GB HBM3"
    alpha = common_pb2.NodeInfo(
        name="alpha",
        address="10.0.0.1:7001",
        devices=[
            common_pb2.DeviceInfo(
                kind=common_pb2.DEVICE_KIND_CUDA, index=i, ordinal=i, name=h100, total_memory_bytes=80 * GIB,
                free_memory_bytes=60 * GIB,
            )
            for i in range(2)
        ],
    )
    beta = common_pb2.NodeInfo(
        name="beta",
        address="10.0.0.2:7001",
        devices=[
            common_pb2.DeviceInfo(
                kind=common_pb2.DEVICE_KIND_CPU, index=0, total_memory_bytes=64 * GIB, free_memory_bytes=32 * GIB
            )
        ],
    )
    return coordinator_pb2.StatusResponse(
        epoch=common_pb2.PlacementEpoch(value=3),
        model="SmolLM2-135M",
        nodes=[
            coordinator_pb2.NodeStatus(
                node_id="n1", info=alpha, state=coordinator_pb2.NODE_STATE_SERVING, last_heartbeat_age_s=0.25
            ),
            coordinator_pb2.NodeStatus(
                node_id="n2", info=beta, state=coordinator_pb2.NODE_STATE_SUSPECT, last_heartbeat_age_s=2.5
            ),
        ],
        stages=[
            coordinator_pb2.StageInfo(
                index=0,
                layers=common_pb2.LayerRange(start=0, end=20),
                members=[
                    coordinator_pb2.StageMember(node_id="n1", device_index=0, tp_rank=0),
                    coordinator_pb2.StageMember(node_id="n1", device_index=1, tp_rank=1),
                ],
                address="10.0.0.1:7001",
                weight_bytes=3 * GIB // 2,
                kv_cache_bytes=4 * GIB,
                num_slots=8,
                slots_fit=24,
            ),
            coordinator_pb2.StageInfo(
                index=1,
                layers=common_pb2.LayerRange(start=20, end=30),
                members=[coordinator_pb2.StageMember(node_id="n2", device_index=0, tp_rank=0)],
                address="10.0.0.2:7001",
                weight_bytes=GIB // 4,
                kv_cache_bytes=GIB,
                num_slots=8,
                slots_fit=8,
            ),
        ],
        requests_running=2,
        requests_waiting=1,
        max_batch_size=8,
        slots_free=6,
        max_step_tokens=256,
        micro_batches=2,
        max_queue=1024,
    )


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self) -> None:
        self.address = ""
        self.requests: list[coordinator_pb2.GenerateRequest] = []
        self.contexts: list[grpc.ServicerContext] = []
        self.rpc_done = threading.Event()
        # None: canned_responses(); a list: exactly these.
        self.responses: list[coordinator_pb2.GenerateResponse] | None = None
        # Stream one token every `interval_s` until the client goes away.
        self.endless = False
        self.interval_s = 0.01
        self.abort_with: tuple[grpc.StatusCode, str] | None = None
        self.status_response = canned_status()
        self.status_calls = 0

    def Generate(self, request, context) -> Iterator[coordinator_pb2.GenerateResponse]:
        self.requests.append(request)
        self.contexts.append(context)
        context.add_callback(self.rpc_done.set)
        if self.abort_with is not None:
            context.abort(*self.abort_with)
        request_id = request.request_id or "assigned-1"
        if self.endless:
            while context.is_active():
                yield coordinator_pb2.GenerateResponse(request_id=request_id, token_ids=[7], text_delta="a")
                time.sleep(self.interval_s)
            return
        responses = canned_responses(request_id) if self.responses is None else self.responses
        yield from responses

    def Status(self, request, context) -> coordinator_pb2.StatusResponse:
        self.status_calls += 1
        if self.abort_with is not None:
            context.abort(*self.abort_with)
        return self.status_response


@pytest.fixture
def fake_coordinator() -> Iterator[FakeCoordinator]:
    servicer = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    try:
        yield servicer
    finally:
        server.stop(grace=None).wait(5)
