"""client.tensors: numpy arrays to and from tensorfleet.v1.Tensor, and validation on arrival."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from client.tensors import (
    DEFAULT_MAX_TENSOR_BYTES,
    MAX_RANK,
    bfloat16_bits_to_float32,
    float32_to_bfloat16_bits,
    tensor_from_proto,
    tensor_to_proto,
)
from tensorfleet.v1 import common_pb2

REPO = Path(__file__).resolve().parents[2]

WIRE_DTYPES = {
    np.float32: common_pb2.DTYPE_FLOAT32,
    np.float16: common_pb2.DTYPE_FLOAT16,
    np.int64: common_pb2.DTYPE_INT64,
    np.int32: common_pb2.DTYPE_INT32,
    np.int8: common_pb2.DTYPE_INT8,
    np.uint8: common_pb2.DTYPE_UINT8,
}


def _wire_round_trip(msg: common_pb2.Tensor) -> common_pb2.Tensor:
    return common_pb2.Tensor.FromString(msg.SerializeToString())


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES))
def test_round_trip_each_dtype(dtype: type) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 5)) * 50).astype(dtype)
    msg = tensor_to_proto(arr)
    assert msg.dtype == WIRE_DTYPES[dtype]
    assert list(msg.shape) == [3, 5]
    assert len(msg.data) == arr.nbytes
    back = tensor_from_proto(_wire_round_trip(msg))
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
def test_round_trip_any_shape(arr: np.ndarray) -> None:
    back = tensor_from_proto(_wire_round_trip(tensor_to_proto(arr)))
    assert back.shape == arr.shape and back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)  # NaNs compare equal here


def test_non_contiguous_and_big_endian_inputs_are_packed_in_c_order_little_endian() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = tensor_from_proto(tensor_to_proto(arr.T))
    np.testing.assert_array_equal(back, arr.T)
    big = arr.astype(">f4")
    msg = tensor_to_proto(big)
    assert msg.data == arr.astype("<f4").tobytes()
    np.testing.assert_array_equal(tensor_from_proto(msg), arr)


def test_received_array_is_read_only() -> None:
    back = tensor_from_proto(tensor_to_proto(np.zeros(4, dtype=np.float32)))
    with pytest.raises(ValueError):
        back[0] = 1.0


def test_bfloat16_travels_as_uint16_bits() -> None:
    values = np.array([1.0, -2.5, 0.0, np.inf, 3.140625], dtype=np.float32)
    bits = float32_to_bfloat16_bits(values)
    assert bits.dtype == np.uint16
    msg = tensor_to_proto(bits, bfloat16=True)
    assert msg.dtype == common_pb2.DTYPE_BFLOAT16 and len(msg.data) == 2 * values.size
    back = tensor_from_proto(_wire_round_trip(msg))
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, bits)
    np.testing.assert_array_equal(bfloat16_bits_to_float32(back), values)  # all exact in bfloat16


def test_bfloat16_rounds_to_nearest_even() -> None:
    one = 0x3F80
    # 1 + 2^-8 lies halfway between 1.0 and the next bfloat16 (1 + 2^-7): ties go to the even one.
    assert float32_to_bfloat16_bits(np.float32(1 + 2**-8)) == one
    assert float32_to_bfloat16_bits(np.float32(1 + 3 * 2**-8)) == one + 2
    assert float32_to_bfloat16_bits(np.float32(1 + 2**-8 + 2**-20)) == one + 1
    nan_bits = float32_to_bfloat16_bits(np.array([np.nan], dtype=np.float32))
    assert np.isnan(bfloat16_bits_to_float32(nan_bits)).all()


def test_uint16_is_refused_unless_marked_bfloat16() -> None:
    with pytest.raises(ValueError, match="bfloat16=True"):
        tensor_to_proto(np.zeros(3, dtype=np.uint16))
    with pytest.raises(ValueError, match="uint16 array of bfloat16 bit patterns"):
        tensor_to_proto(np.zeros(3, dtype=np.float32), bfloat16=True)


@pytest.mark.parametrize("dtype", [np.float64, np.bool_, np.complex64, np.uint32, object])
def test_unsupported_dtypes_are_refused_when_sending(dtype: type) -> None:
    with pytest.raises(ValueError, match="cannot travel"):
        tensor_to_proto(np.zeros(2, dtype=dtype))


def test_wrong_byte_count_is_rejected() -> None:
    msg = tensor_to_proto(np.zeros((2, 3), dtype=np.float32))
    short = common_pb2.Tensor(dtype=msg.dtype, shape=msg.shape, data=msg.data[:-1])
    with pytest.raises(ValueError, match=r"has 23 bytes, but shape \[2, 3\] of DTYPE_FLOAT32 .* needs 24"):
        tensor_from_proto(short)
    long = common_pb2.Tensor(dtype=msg.dtype, shape=msg.shape, data=msg.data + b"\0" * 4)
    with pytest.raises(ValueError, match="has 28 bytes"):
        tensor_from_proto(long)


@pytest.mark.parametrize("dtype", [common_pb2.DTYPE_UNSPECIFIED, 99])
def test_bad_dtype_is_rejected(dtype: int) -> None:
    msg = common_pb2.Tensor(dtype=dtype, shape=[1], data=b"\0" * 4)
    msg = _wire_round_trip(msg)  # an unknown enum value survives parsing (proto3 open enums)
    with pytest.raises(ValueError, match="is not allowed; allowed: DTYPE_FLOAT32"):
        tensor_from_proto(msg)


def test_negative_dimension_is_rejected() -> None:
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_INT8, shape=[-1, -4], data=b"\0" * 4)
    with pytest.raises(ValueError, match="negative dimension"):
        tensor_from_proto(msg)


def test_oversize_is_rejected_before_looking_at_the_data() -> None:
    # Claims 2^40 float32 elements with no data: refused on the claim alone, nothing is allocated.
    huge = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20])
    with pytest.raises(ValueError, match=f"over the limit of {DEFAULT_MAX_TENSOR_BYTES} bytes"):
        tensor_from_proto(huge)
    ok = tensor_to_proto(np.zeros(16, dtype=np.float32))
    assert tensor_from_proto(ok, max_bytes=64).shape == (16,)
    with pytest.raises(ValueError, match="takes 64 bytes, over the limit of 63 bytes"):
        tensor_from_proto(ok, max_bytes=63)


def test_rank_is_bounded() -> None:
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=[1] * (MAX_RANK + 1), data=b"\0")
    with pytest.raises(ValueError, match=f"rank {MAX_RANK + 1}"):
        tensor_from_proto(msg)


def test_scalar_and_empty_tensors() -> None:
    scalar = tensor_from_proto(tensor_to_proto(np.array(7, dtype=np.int64)))
    assert scalar.shape == () and scalar == 7
    empty = tensor_from_proto(tensor_to_proto(np.zeros((0, 8), dtype=np.float16)))
    assert empty.shape == (0, 8)


def test_not_a_tensor_message_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="expected a tensorfleet.v1.Tensor"):
        tensor_from_proto(common_pb2.TokenIds(ids=[1]))  # type: ignore[arg-type]


def test_importing_client_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import client, client.tensors, client.api, client.display, client.cli\n"
        "heavy = sorted(m for m in ('torch', 'engine', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "proto"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing client pulled in: {out.stdout.strip()}"
