"""Tensors and sampling parameters on the wire: exact round trips, and validation on arrival."""

from __future__ import annotations

import pytest
import torch

from engine.sampling import SamplingParams
from node.wire import (
    WireError,
    decode_from_proto,
    encoded_to_proto,
    sampling_from_proto,
    sampling_to_proto,
    tensor_from_proto,
    tensor_to_proto,
)
from tensorfleet.v1 import common_pb2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                                   torch.int8, torch.uint8])
def test_tensor_round_trip_is_exact(dtype: torch.dtype) -> None:
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    back = tensor_from_proto(tensor_to_proto(t))
    assert back.dtype == dtype and torch.equal(back, t)


def test_empty_tensor() -> None:
    back = tensor_from_proto(tensor_to_proto(torch.empty(0, 4)))
    assert back.shape == (0, 4)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.__setattr__("data", m.data[:-1]), "needs"),
    (lambda m: m.__setattr__("dtype", common_pb2.DTYPE_UNSPECIFIED), "not allowed"),
    (lambda m: m.__setattr__("dtype", 999), "not allowed"),
    (lambda m: m.shape.__setitem__(0, -2), "negative"),
])
def test_bad_tensors_are_rejected(mutate, message: str) -> None:  # noqa: ANN001
    msg = tensor_to_proto(torch.ones(2, 3))
    mutate(msg)
    with pytest.raises(WireError, match=message):
        tensor_from_proto(msg)


def test_size_bound() -> None:
    msg = tensor_to_proto(torch.ones(64))
    with pytest.raises(WireError, match="exceeds the limit"):
        tensor_from_proto(msg, max_bytes=100)


def test_sampling_params_round_trip_and_defaults() -> None:
    p = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.1, max_tokens=33, seed=7,
                       stop=("END",), stop_token_ids=(2,), ignore_eos=True)
    assert sampling_from_proto(sampling_to_proto(p)) == p
    assert sampling_from_proto(common_pb2.SamplingParams()) == SamplingParams()
    with pytest.raises(ValueError, match="top_p"):
        sampling_from_proto(common_pb2.SamplingParams(top_p=2.0))


@pytest.mark.parametrize("spec", ["exact", "int8", "int8:rotate=true", "int4", "lowrank:rank=4"])
def test_encoded_tensors_round_trip_through_the_wire_form(spec: str) -> None:
    from engine.codecs import make_codec

    x = torch.randn(70, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    codec = make_codec(spec)
    enc = codec.encode(x, key=1)
    msg = common_pb2.EncodedTensor.FromString(encoded_to_proto(enc).SerializeToString())
    got = decode_from_proto(msg)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert torch.equal(got, codec.decode(enc))  # the wire adds nothing to the codec's own error
    if spec != "exact":
        assert msg.ByteSize() < 0.6 * tensor_to_proto(x).ByteSize()


def test_malformed_encoded_tensors_are_refused() -> None:
    from engine.codecs import make_codec

    good = encoded_to_proto(make_codec("int8").encode(torch.randn(4, 256)))
    cases = []
    bad = common_pb2.EncodedTensor()
    bad.CopyFrom(good)
    bad.codec = "zstd"
    cases.append((bad, "unknown codec"))
    bad = common_pb2.EncodedTensor()
    bad.CopyFrom(good)
    del bad.parts["scale"]
    cases.append((bad, "cannot decode"))
    bad = common_pb2.EncodedTensor()
    bad.CopyFrom(good)
    bad.shape[:] = [1 << 40, 256]
    cases.append((bad, "too large"))
    bad = common_pb2.EncodedTensor()
    bad.CopyFrom(good)
    bad.dtype = common_pb2.DTYPE_INT64
    cases.append((bad, "must decode to floats"))
    bad = common_pb2.EncodedTensor()
    bad.CopyFrom(good)
    bad.codec = "int8:" + "x" * 300
    cases.append((bad, "codec spec"))
    for msg, match in cases:
        with pytest.raises(WireError, match=match):
            decode_from_proto(msg)
