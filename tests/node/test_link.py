"""The link policy (node/link.py): parsing --codec, the auto threshold from a measured link and codec
cost, and the measurements themselves (against a real Stage server on loopback)."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import torch

from engine.codecs import make_codec
from engine.errors import ConfigError
from node.link import (
    AUTO_CODEC,
    CodecCost,
    LinkEstimate,
    LinkMode,
    LinkPolicy,
    measure_cost,
    measure_link,
    parse_link_codec,
)
from tensorfleet.v1 import node_pb2, node_pb2_grpc


@pytest.mark.parametrize("text, mode, spec", [
    ("exact", "exact", "exact"), ("", "exact", "exact"), ("int8", "force", "int8"),
    ("int4:outliers=4", "force", "int4:outliers=4"), ("auto", "auto", AUTO_CODEC),
    ("auto:int4", "auto", "int4"), ("lowrank:rank=8", "force", "lowrank:rank=8")])
def test_codec_flag_parses(text: str, mode: str, spec: str) -> None:
    parsed = parse_link_codec(text)
    assert (parsed.mode, parsed.spec) == (mode, make_codec(spec).spec)
    assert parse_link_codec(str(parsed)) == parsed  # round-trips through the LoadStage string


@pytest.mark.parametrize("text, complaint", [("auto:exact", "compressing codec"), ("auto:zstd", "zstd"),
                                             ("int8:block=0", "block=0"), ("auto:", "unknown codec")])
def test_bad_codec_flags_are_refused(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_link_codec(text)


# 100 Mbit/s; an int8 row of 576 bf16 values: 1152 bytes -> 598.
SLOW = LinkEstimate(bandwidth=100e6 / 8, latency_s=0.001)
COST = CodecCost(fixed_s=2e-4, per_row_s=5e-6, row_bytes=1152, coded_row_bytes=598)


def test_auto_compresses_a_slow_link_from_the_break_even_size() -> None:
    policy = LinkPolicy(LinkMode("auto", AUTO_CODEC), min_tokens=0)
    assert policy.choose(10_000) is None  # not measured yet: exact
    policy.measured(SLOW, COST)
    gain = (1152 - 598) / SLOW.bandwidth - COST.per_row_s  # seconds saved per row, net
    n_star = policy.min_tokens
    assert n_star is not None and (n_star - 1) * gain <= COST.fixed_s < n_star * gain
    assert policy.choose(n_star - 1) is None and policy.choose(n_star).spec == make_codec(AUTO_CODEC).spec
    floored = LinkPolicy(LinkMode("auto", AUTO_CODEC), min_tokens=64)
    floored.measured(SLOW, COST)
    assert floored.min_tokens == max(64, n_star)
    assert "compress from" in floored.describe() and "Mbit/s" in floored.describe()
    policy.forget_link()  # a new next hop: exact until measured again
    assert policy.choose(10_000) is None


def test_auto_never_compresses_a_link_faster_than_the_codec() -> None:
    policy = LinkPolicy(LinkMode("auto", AUTO_CODEC), min_tokens=0)
    policy.measured(LinkEstimate(bandwidth=10e9, latency_s=1e-4), COST)  # 10 GB/s: 0.06 us/row saved < 5 us
    assert policy.min_tokens is None and policy.choose(100_000) is None
    assert "compress never" in policy.describe()


def test_forced_and_exact_ignore_the_link() -> None:
    forced = LinkPolicy(LinkMode("force", "int4"), min_tokens=64)
    forced.measured(LinkEstimate(bandwidth=10e9, latency_s=1e-4), COST)
    assert forced.choose(63) is None and forced.choose(64).spec == make_codec("int4").spec
    exact = LinkPolicy(LinkMode("exact"), min_tokens=0)
    exact.measured(SLOW, COST)
    assert exact.choose(10_000) is None


def test_measured_cost_has_the_codecs_byte_ratio() -> None:
    codec = make_codec(AUTO_CODEC)
    cost = measure_cost(codec, 576, torch.bfloat16, "cpu")
    x = torch.randn(7, 576).to(torch.bfloat16)
    assert cost.row_bytes == pytest.approx(576 * 2, rel=0.01)  # plus the proto framing
    assert cost.coded_row_bytes == pytest.approx(codec.encode(x).nbytes / 7, rel=0.01)
    assert cost.fixed_s >= 0


class _Sink(node_pb2_grpc.StageServicer):
    def Probe(self, request, context):  # noqa: ANN001, ANN201, N802
        return node_pb2.ProbeResponse(received_bytes=len(request.payload))


def test_measure_link_on_loopback() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    node_pb2_grpc.add_StageServicer_to_server(_Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        link = measure_link(f"127.0.0.1:{port}")
    finally:
        server.stop(None)
    # Loopback through gRPC in Python: hundreds of MB/s at least, and a sub-10 ms round trip.
    assert link.bandwidth > 50e6 and 0 < link.latency_s < 0.01
