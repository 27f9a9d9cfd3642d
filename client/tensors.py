"""Tensors on the wire: numpy arrays to and from ``tensorfleet.v1.Tensor``, validated on arrival.

A Tensor is raw little-endian bytes plus a dtype and a shape (row-major, C order); it is never
pickled. ``tensor_from_proto`` checks what arrives before using it: the dtype must be one of the
allowed ones, no dimension may be negative, the rank and the byte size are bounded, and the byte
count must equal prod(shape) * itemsize. Any violation raises ``ValueError`` with a message that
names the numbers involved.

bfloat16: numpy has no bfloat16 type, so a bfloat16 tensor travels as its raw 16-bit patterns (the
upper half of each float32's bits) and arrives as a ``uint16`` array holding those bits. Send one with
``tensor_to_proto(bits, bfloat16=True)``; ``float32_to_bfloat16_bits`` and
``bfloat16_bits_to_float32`` convert. With torch on hand, the bits of a bfloat16 tensor ``t`` are
``t.view(torch.int16).numpy().view(numpy.uint16)``, and
``torch.from_numpy(bits.view(numpy.int16)).view(torch.bfloat16)`` turns them back without a copy.
Arrays of the ``bfloat16`` dtype of the ml_dtypes package are accepted as they are.
"""

from __future__ import annotations

import math

import numpy as np

from tensorfleet.v1 import common_pb2

# A bound on what one tensor may claim, so that a corrupt or hostile shape cannot make a receiver
# allocate without limit. 1 GiB is above any activation message we send (gRPC caps a message at 2 GiB).
DEFAULT_MAX_TENSOR_BYTES = 1 << 30
MAX_RANK = 8

# Wire dtype -> numpy dtype of the bytes (little-endian whatever the host's byte order).
_WIRE_DTYPES: dict[int, np.dtype] = {
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),  # raw bfloat16 bits
    common_pb2.DTYPE_INT64: np.dtype("<i8"),
    common_pb2.DTYPE_INT32: np.dtype("<i4"),
    common_pb2.DTYPE_INT8: np.dtype("i1"),
    common_pb2.DTYPE_UINT8: np.dtype("u1"),
}

# numpy dtype (native byte order) -> wire dtype; uint16 is absent on purpose: it is ambiguous, and
# only means bfloat16 when the caller says so.
_FROM_NUMPY: dict[np.dtype, int] = {
    np.dtype(np.float32): common_pb2.DTYPE_FLOAT32,
    np.dtype(np.float16): common_pb2.DTYPE_FLOAT16,
    np.dtype(np.int64): common_pb2.DTYPE_INT64,
    np.dtype(np.int32): common_pb2.DTYPE_INT32,
    np.dtype(np.int8): common_pb2.DTYPE_INT8,
    np.dtype(np.uint8): common_pb2.DTYPE_UINT8,
}


def _dtype_name(dtype: int) -> str:
    try:
        return common_pb2.DType.Name(dtype)
    except ValueError:
        return f"unknown dtype value {dtype}"


def _allowed_names() -> str:
    return ", ".join(common_pb2.DType.Name(d) for d in _WIRE_DTYPES)


def tensor_to_proto(array: np.ndarray, *, bfloat16: bool = False) -> common_pb2.Tensor:
    """Packs ``array`` as a Tensor (a copy of its data, C order, little-endian).

    ``bfloat16=True`` sends a ``uint16`` array of bfloat16 bit patterns as DTYPE_BFLOAT16.
    """
    arr = np.asarray(array)
    if arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2:  # ml_dtypes.bfloat16
        arr = np.ascontiguousarray(arr).view(np.uint16)
        bfloat16 = True
    native = arr.dtype.newbyteorder("=")
    if bfloat16:
        if native != np.dtype(np.uint16):
            raise ValueError(
                f"bfloat16=True expects a uint16 array of bfloat16 bit patterns, got dtype {arr.dtype}; "
                "convert float32 values with float32_to_bfloat16_bits()"
            )
        wire = common_pb2.DTYPE_BFLOAT16
    elif native == np.dtype(np.uint16):
        raise ValueError(
            "uint16 arrays are not sent as such; if the array holds bfloat16 bit patterns, pass bfloat16=True"
        )
    elif native in _FROM_NUMPY:
        wire = _FROM_NUMPY[native]
    else:
        raise ValueError(
            f"dtype {arr.dtype} cannot travel as a tensor; allowed: float32, float16, bfloat16 "
            "(as uint16 bits), int64, int32, int8, uint8"
        )
    data = np.ascontiguousarray(arr, dtype=_WIRE_DTYPES[wire]).tobytes()
    return common_pb2.Tensor(dtype=wire, shape=arr.shape, data=data)


def tensor_from_proto(msg: common_pb2.Tensor, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> np.ndarray:
    """Validates ``msg`` and returns its contents as an array in the host's byte order.

    The array shares memory with the message's bytes and is read-only (copy it to write to it).
    DTYPE_BFLOAT16 arrives as ``uint16`` bit patterns (see the module docstring).
    Raises ValueError when the tensor is malformed or larger than ``max_bytes``.
    """
    if not isinstance(msg, common_pb2.Tensor):
        raise TypeError(f"expected a tensorfleet.v1.Tensor, got {type(msg).__name__}")
    wire = _WIRE_DTYPES.get(msg.dtype)
    if wire is None:
        raise ValueError(f"tensor dtype {_dtype_name(msg.dtype)} is not allowed; allowed: {_allowed_names()}")
    name = common_pb2.DType.Name(msg.dtype)
    shape = tuple(msg.shape)
    if len(shape) > MAX_RANK:
        raise ValueError(f"tensor has rank {len(shape)}, more than the maximum of {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * wire.itemsize
    if expected > max_bytes:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {name} takes {expected} bytes, "
            f"over the limit of {max_bytes} bytes"
        )
    data = msg.data
    if len(data) != expected:
        raise ValueError(
            f"tensor data has {len(data)} bytes, but shape {list(shape)} of {name} "
            f"({wire.itemsize} bytes per element) needs {expected}"
        )
    arr = np.frombuffer(data, dtype=wire).reshape(shape)
    if not wire.isnative:  # big-endian host
        arr = arr.astype(wire.newbyteorder("="))
        arr.flags.writeable = False
    return arr


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of ``values``, rounded to nearest, ties to even (as torch does)."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():  # keep NaN a NaN: rounding could carry into the exponent and make it infinity
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact: every bfloat16 is a float32)."""
    b = np.asarray(bits)
    if b.dtype.newbyteorder("=") != np.dtype(np.uint16):
        raise ValueError(f"expected a uint16 array of bfloat16 bit patterns, got dtype {b.dtype}")
    return (b.astype(np.uint32) << 16).view(np.float32)
