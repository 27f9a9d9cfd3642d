"""Conversions between protobuf messages and engine types, in one place.

Tensors travel as raw bytes with dtype and shape (never pickle) and are validated on arrival: the dtype
must be allowed, dimensions non-negative, the size bounded and the byte count exact.
"""

from __future__ import annotations

import math

import torch

from engine.codecs import Encoded, make_codec
from engine.sampling import SamplingParams
from engine.transfer import to_device
from tensorfleet.v1 import common_pb2

MAX_TENSOR_BYTES = 1 << 31  # 2 GiB: far above any activation message, far below what would exhaust a node
MAX_CODEC_SPEC = 200  # characters
MAX_PARTS = 8

_TO_PROTO = {torch.float32: common_pb2.DTYPE_FLOAT32, torch.float16: common_pb2.DTYPE_FLOAT16,
             torch.bfloat16: common_pb2.DTYPE_BFLOAT16, torch.int64: common_pb2.DTYPE_INT64,
             torch.int32: common_pb2.DTYPE_INT32, torch.int8: common_pb2.DTYPE_INT8,
             torch.uint8: common_pb2.DTYPE_UINT8, torch.int16: common_pb2.DTYPE_INT16}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}


class WireError(ValueError):
    """A message that fails validation; the RPC layer answers INVALID_ARGUMENT with this text."""


def dtype_to_proto(dtype: torch.dtype) -> int:
    if dtype not in _TO_PROTO:
        raise WireError(f"dtype {dtype} cannot travel on the wire")
    return _TO_PROTO[dtype]


def dtype_from_proto(code: int) -> torch.dtype:
    if code not in _FROM_PROTO:
        raise WireError(f"dtype code {code} is not allowed here")
    return _FROM_PROTO[code]


def tensor_to_proto(t: torch.Tensor) -> common_pb2.Tensor:
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
    return common_pb2.Tensor(dtype=dtype_to_proto(t.dtype), shape=list(t.shape), data=raw.numpy().tobytes())


def tensor_from_proto(msg: common_pb2.Tensor, *, max_bytes: int = MAX_TENSOR_BYTES,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    dtype = dtype_from_proto(msg.dtype)
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"tensor shape {shape} has a negative dimension")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if expected > max_bytes:
        raise WireError(f"tensor of {expected} bytes exceeds the limit of {max_bytes}")
    if len(msg.data) != expected:
        raise WireError(f"tensor data has {len(msg.data)} bytes; shape {shape} of {dtype} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    flat = torch.frombuffer(bytearray(msg.data), dtype=dtype)
    return to_device(flat.reshape(shape), torch.device(device))  # not waiting for this device's queued work


def encoded_to_proto(e: Encoded) -> common_pb2.EncodedTensor:
    msg = common_pb2.EncodedTensor(codec=e.codec, shape=list(e.shape), dtype=dtype_to_proto(e.dtype))
    for name, part in e.parts.items():
        msg.parts[name].CopyFrom(tensor_to_proto(part))
    return msg


def decode_from_proto(msg: common_pb2.EncodedTensor, *, max_bytes: int = MAX_TENSOR_BYTES,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor an EncodedTensor carries, decoded; WireError for anything malformed."""
    if len(msg.codec) > MAX_CODEC_SPEC or len(msg.parts) > MAX_PARTS:
        raise WireError(f"encoded tensor with a {len(msg.codec)}-character codec spec and {len(msg.parts)} parts")
    dtype = dtype_from_proto(msg.dtype)
    if not dtype.is_floating_point:
        raise WireError(f"an encoded tensor must decode to floats, not {dtype}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape) or math.prod(shape) * dtype.itemsize > max_bytes:
        raise WireError(f"encoded tensor shape {list(shape)} is negative or too large")
    parts = {name: tensor_from_proto(t, max_bytes=max_bytes, device=device) for name, t in msg.parts.items()}
    try:
        codec = make_codec(msg.codec)
        return codec.decode(Encoded(codec=msg.codec, shape=shape, dtype=dtype, parts=parts))
    except (ValueError, RuntimeError) as e:  # a bad spec, missing or misshapen parts
        raise WireError(f"cannot decode a {msg.codec!r} tensor: {e}") from e


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take the engine's defaults; ConfigError (a ValueError) for bad values."""
    defaults = SamplingParams()
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else defaults.top_p,
        min_p=msg.min_p,
        repetition_penalty=(msg.repetition_penalty if msg.HasField("repetition_penalty")
                            else defaults.repetition_penalty),
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else defaults.max_tokens,
        stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop),
        seed=msg.seed if msg.HasField("seed") else None,
        ignore_eos=msg.ignore_eos,
    )


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                                    repetition_penalty=p.repetition_penalty, max_tokens=p.max_tokens,
                                    stop_token_ids=list(p.stop_token_ids), stop=list(p.stop),
                                    ignore_eos=p.ignore_eos)
    if p.seed is not None:
        msg.seed = p.seed
    return msg
