"""Limits on what one client may send or hold, each refused with a clear status code."""

from __future__ import annotations

import grpc
import pytest

from client.api import ClientError, TensorfleetClient
from coordinator.local_cluster import LocalCluster
from coordinator.server import StreamLimiter
from engine.errors import ConfigError
from engine.sampling import MAX_STOPS, SamplingParams
from node.security import bearer
from tensorfleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.security.conftest import MAX_SEQ_LEN


def _generate(cluster: LocalCluster, request: coordinator_pb2.GenerateRequest) -> grpc.RpcError:
    with grpc.insecure_channel(cluster.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(request, metadata=bearer(cluster.api_key), timeout=30))
    return e.value


def test_a_message_over_the_size_limit_is_refused(cluster: LocalCluster) -> None:
    err = _generate(cluster, coordinator_pb2.GenerateRequest(text="x" * (5 << 20)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_prompt_over_the_character_limit_is_refused(cluster: LocalCluster) -> None:
    err = _generate(cluster, coordinator_pb2.GenerateRequest(text="x" * ((1 << 20) + 1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "characters" in err.details()


@pytest.mark.parametrize("build, complaint", [
    (lambda r: r.token_ids.ids.extend([1] * MAX_SEQ_LEN), "exceeds max_seq_len"),
    (lambda r: setattr(r.sampling, "max_tokens", MAX_SEQ_LEN), "exceeds max_seq_len"),
    (lambda r: r.sampling.stop.extend(["a"] * (MAX_STOPS + 1)), "stop strings"),
    (lambda r: r.sampling.stop.append("y" * 300), "at most 256 characters"),
    (lambda r: r.token_ids.ids.extend([10**6]), "token ids must be in"),
    (lambda r: setattr(r.sampling, "temperature", -1.0), "temperature"),
])
def test_bad_requests_are_invalid_arguments(cluster: LocalCluster, build, complaint: str) -> None:  # noqa: ANN001
    request = coordinator_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[1, 2]))
    build(request)
    err = _generate(cluster, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and complaint in err.details(), err.details()


def test_a_client_over_its_stream_limit_is_refused_until_one_ends(cluster: LocalCluster) -> None:
    with TensorfleetClient(cluster.address, timeout=60) as client:
        first = client.generate_stream([1, 2, 3], max_tokens=MAX_SEQ_LEN - 8, ignore_eos=True)
        next(first)  # it runs: the client holds its one stream
        with pytest.raises(ClientError) as e:
            client.generate([4, 5], max_tokens=2)
        assert e.value.code == "RESOURCE_EXHAUSTED" and "--max-streams-per-client" in str(e.value)
        for _ in first:
            pass
        assert len(client.generate([4, 5], max_tokens=2, ignore_eos=True).token_ids) == 2  # released


def test_stream_limiter_counts_per_client() -> None:
    limiter = StreamLimiter(2)
    assert limiter.acquire("a") and limiter.acquire("a") and not limiter.acquire("a") and limiter.acquire("b")
    limiter.release("a")
    assert limiter.acquire("a") and not limiter.acquire("a")
    for _ in range(3):
        limiter.release("a")
    assert limiter.active == {"b": 1}


def test_sampling_bounds() -> None:
    with pytest.raises(ConfigError, match="stop strings"):
        SamplingParams(stop=tuple("s" * (i + 1) for i in range(MAX_STOPS + 1)))
    with pytest.raises(ConfigError, match="stop token ids"):
        SamplingParams(stop_token_ids=tuple(range(65)))
