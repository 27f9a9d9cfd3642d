"""Codecs for compressed exchange of activations (hidden states ``[..., hidden]``) between stages.

A codec turns a float tensor into an :class:`Encoded`: the original shape and dtype plus named,
contiguous payload tensors of fixed dtypes (``parts``) that a wire layer sends as raw bytes.
``Encoded.codec`` is a spec that ``make_codec`` parses, so ``decode(e)`` needs nothing else. All
arithmetic is in fp32; ``decode`` returns the original dtype and shape. Encoders never pad the payload:
a partial last block is quantized as if zero-padded, and the padding follows from ``shape``.

Formats (n rows of m = hidden elements) and error bounds (x: input row, x̂: decoded row):

- ``exact``: ``x`` as is. Bit-exact.
- ``int8:block=128,rotate=false``: per row, blocks of ``block`` along the last dimension, scale
  ``s = absmax/127``, ``q = round(x/s)`` (half to even). Parts: ``q`` int8 ``[n, m]``, ``scale`` fp32
  ``[n, ceil(m/block)]``. fp32 scales (3% of the values' bytes at block 128) are exact over the whole
  float range (in fp16, blocks of absmax above 8.3e6 overflow, below 7.8e-3 lose precision). Bound:
  ``|x - x̂| <= s/2`` per element, so ``||x - x̂|| <= sqrt(block)/254 * ||x||`` (4.5%) at worst, about
  0.65% on Gaussian rows. Bytes ``m + 4*ceil(m/block)`` per row: 3.87x fewer than fp32, 1.93x than bf16 at m=576.
  ``rotate=true`` quantizes ``H D x`` instead (below): same bytes, and on outlier channels 10-300x
  larger than the rest the error is 1.7-7x smaller (bound in norm as for int4, not per element).
- ``int4:block=32,rotate=true``: rotate each row, ``y = H D x`` (D: fixed random signs, so no
  structured input lines up with a Hadamard row; H: normalized Walsh-Hadamard of size h = the largest
  power of two dividing m, block-diagonal along the row: no padding or extra bytes, but h=4 for
  m=100), quantize y as above with ``s = absmax/7`` (codes -7..7 stored as ``q+8``, two per byte, first
  in the low nibble, over the flattened codes), decode and apply the inverse ``D H``. Parts: ``q``
  uint8 ``[ceil(n*m/2)]``, ``scale`` fp16 ``[n, ceil(m/block)]`` (fp32: 3.2x vs bf16, not 3.56x;
  scales saturate at the fp16 maximum, rotated values past 4.5e5 clip). H D is orthogonal, so
  ``||x - x̂||^2 <= sum_b len_b * (s_b/2)^2 <= block/196 * ||x||^2`` (40%) at worst, about 10% on
  Gaussian rows. Bytes ``m/2 + 2*ceil(m/block)``: 7.1x vs fp32, 3.56x vs bf16 at m=576. The rotation
  cuts the error of outlier channels 10-50x larger than the rest by up to 2x (1.2-1.4x at m=2048);
  at >=100x it stops helping (it spreads an outlier over h values; without it, a block of 32 confines
  it). ``rotate=false`` compares.
- ``lowrank:rank=4,min_rate=1.0,error_feedback=false``: X as ``[n, m]``. PowerSGD, one power
  iteration: ``P = X Q``, Q warm-started from the last call on the same ``key`` and m (else random,
  fixed seed), P orthonormalized by fp32 QR, ``Q = X^T P``; decode ``P Q^T``, the projection of X on
  span(P): exact when rank(X) <= r, already on the first call. Parts ``p [n, r]``, ``q [m, r]`` in
  the input's dtype (so the element count is the byte ratio), columns rescaled to equal norms (no
  overflow in fp16). Compresses only where ``(n+m)*r*min_rate < n*m``, else sends ``exact`` (and
  ``Encoded.codec`` says so). State: the last Q per key, for the 1024 most recently used keys.

Non-finite values spoil their block (Hadamard group; low-rank message): they are not preserved.
Error feedback (lowrank only) adds the last residual of the same key to the next input. It is off by
default: it serves sums over many steps (gradients), while activations are used once, and it would
add one batch's error to the next batch's hidden states (measured in the tests: each message's error
grows 2x and more while only the sum of the messages gets closer).
"""

from __future__ import annotations

import functools
import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F

from engine.errors import ConfigError

MAX_BLOCK = 1 << 16
MAX_RANK = 1 << 12
SIGN_SEED = 0x5EED
Q_SEED = 0x0C0DEC


@dataclass(frozen=True, eq=False)
class Encoded:
    codec: str  # a spec make_codec parses into a codec that decodes this
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the original tensor
    parts: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


class Codec(ABC):
    name: ClassVar[str]
    PARAMS: ClassVar[dict[str, type]] = {}
    QUIET: ClassVar[dict[str, object]] = {}  # parameters left out of the spec at these values

    @property
    def spec(self) -> str:
        """Canonical spec: ``make_codec(c.spec)`` builds an equivalent codec."""
        shown = [k for k in self.PARAMS if k not in self.QUIET or getattr(self, k) != self.QUIET[k]]
        if not shown:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={_format(getattr(self, k))}" for k in shown)

    @abstractmethod
    def encode(self, x: torch.Tensor, *, key: Hashable | None = None) -> Encoded: ...

    @abstractmethod
    def decode(self, e: Encoded) -> torch.Tensor: ...

    def _check_codec(self, e: Encoded) -> None:
        if e.codec != self.spec:
            raise ValueError(f"payload was encoded with {e.codec!r}; this codec is {self.spec!r}")


def _format(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _check_parts(e: Encoded, expected: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
    """Validate an arriving payload: exactly the expected parts, with their dtypes and shapes."""
    if set(e.parts) != set(expected):
        raise ValueError(f"{e.codec}: parts {sorted(e.parts)}, expected {sorted(expected)}")
    for name, (dtype, shape) in expected.items():
        t = e.parts[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{e.codec}: part {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    """x as fp32 ``[n, m]`` (leading dimensions flattened)."""
    if not x.is_floating_point():
        raise ValueError(f"{what} encodes floating-point tensors, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"{what} needs a non-empty last dimension, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]).float()


def _dims(e: Encoded) -> tuple[int, int]:
    if not e.dtype.is_floating_point or len(e.shape) == 0 or e.shape[-1] <= 0 or min(e.shape) < 0:
        raise ValueError(f"{e.codec}: cannot decode to {e.dtype} of shape {e.shape}")
    return math.prod(e.shape[:-1]), e.shape[-1]


class ExactCodec(Codec):
    name = "exact"

    def encode(self, x: torch.Tensor, *, key: Hashable | None = None) -> Encoded:
        return Encoded(self.name, tuple(x.shape), x.dtype, {"x": x.contiguous()})

    def decode(self, e: Encoded) -> torch.Tensor:
        self._check_codec(e)
        _check_parts(e, {"x": (e.dtype, e.shape)})
        return e.parts["x"]


# ---- block quantization and the Walsh-Hadamard rotation ----


def quantize_blocks(x: torch.Tensor, block: int, qmax: int, scale_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization of fp32 ``[n, m]`` per block: int8 codes ``[n, m]``, scales."""
    n, m = x.shape
    nb = -(-m // block)
    xp = F.pad(x, (0, nb * block - m)).view(n, nb, block)
    limit = torch.finfo(scale_dtype).max
    scale = (xp.abs().amax(-1) / qmax).clamp(max=limit).to(scale_dtype)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)  # all-zero block: any divisor works
    q = torch.round(xp / s).clamp(-qmax, qmax).to(torch.int8)
    return q.view(n, nb * block)[:, :m].contiguous(), scale.contiguous()


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    n, m = q.shape
    nb = scale.shape[1]
    qp = F.pad(q.float(), (0, nb * block - m)).view(n, nb, block)
    return (qp * scale.float().unsqueeze(-1)).view(n, nb * block)[:, :m]


def hadamard_size(m: int) -> int:
    """The largest power of two dividing m: the block of the block-diagonal Hadamard rotation."""
    return m & -m


def hadamard_transform(x: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform of the last dimension, block-diagonal in blocks of
    ``size`` (default: ``hadamard_size``). Orthogonal, symmetric, self-inverse and linear; log2(size)
    vectorized butterfly steps, O(m log m) per row instead of a dense matmul's O(m*size)."""
    m = x.shape[-1]
    h = size or hadamard_size(m)
    if h & (h - 1) or m % h:
        raise ValueError(f"Hadamard size {h} must be a power of two dividing {m}")
    y = x.reshape(-1, h)
    step = 1
    while step < h:
        pairs = y.view(-1, h // (2 * step), 2, step)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        step *= 2
    return (y * h**-0.5).reshape(x.shape)


@functools.lru_cache(maxsize=64)
def _signs(m: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(SIGN_SEED)
    return (torch.randint(0, 2, (m,), generator=g) * 2 - 1).float().to(device)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """``H D x`` row-wise: random signs first, so no structured input lines up with a Hadamard row."""
    return hadamard_transform(x * _signs(x.shape[-1], x.device))


def hadamard_unrotate(y: torch.Tensor) -> torch.Tensor:
    return hadamard_transform(y) * _signs(y.shape[-1], y.device)


def _check_block(block: int) -> None:
    if not 0 < block <= MAX_BLOCK:
        raise ConfigError(f"block={block} must be in 1..{MAX_BLOCK}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [-8, 7] (int8, any shape) to uint8, two per byte, first one in the low nibble."""
    u = (q.flatten() + 8).to(torch.uint8)
    if u.numel() % 2:
        u = F.pad(u, (0, 1), value=8)
    return (u[0::2] | (u[1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten()[:count]
    return nibbles.to(torch.int8) - 8


MAX_OUTLIERS = 64  # per row
MAX_OUTLIER_WIDTH = 1 << 15  # outlier positions travel as int16


class _BlockCodec(Codec):
    """Per-block absmax quantization along the last dimension, optionally after the rotation.

    ``outliers=k`` > 0 takes each row's k largest magnitudes out first and sends them exactly (values in
    the input's dtype, positions as int16); the rest is rotated and quantized. Hidden states of some
    models carry a few "massive activations" (SmolLM2: one channel near 2e4 against a typical 2): in a
    block, or spread by the rotation, they leave the other values a few codes. With them out, the
    blocks' scales are moderate, so int8 then stores its scales in fp16 as int4 does.
    """

    PARAMS = {"block": int, "rotate": bool, "outliers": int}
    QUIET = {"outliers": 0}
    qmax: ClassVar[int]
    nibbles: ClassVar[bool]  # codes packed two per byte

    def __init__(self, block: int, rotate: bool, outliers: int, scale_dtype: torch.dtype) -> None:
        _check_block(block)
        if not 0 <= outliers <= MAX_OUTLIERS:
            raise ConfigError(f"outliers={outliers} must be in 0..{MAX_OUTLIERS}")
        self.block, self.rotate, self.outliers, self.scale_dtype = block, rotate, outliers, scale_dtype

    def encode(self, x: torch.Tensor, *, key: Hashable | None = None) -> Encoded:
        rows = _rows(x, self.name)
        parts: dict[str, torch.Tensor] = {}
        if self.outliers:
            m = rows.shape[1]
            if not self.can_encode(m):
                raise ValueError(f"{self.spec}: rows of {m} values cannot carry {self.outliers} outliers")
            idx = rows.abs().topk(self.outliers, dim=1).indices  # [n, k]
            parts["outlier_pos"] = idx.to(torch.int16).contiguous()
            parts["outlier_val"] = rows.gather(1, idx).to(x.dtype).contiguous()
            rows = rows.scatter(1, idx, 0.0)
        y = hadamard_rotate(rows) if self.rotate else rows
        q, scale = self._quantize(y)
        parts |= {"q": pack_int4(q) if self.nibbles else q, "scale": scale}
        return Encoded(self.spec, tuple(x.shape), x.dtype, parts)

    def _quantize(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_blocks(y, self.block, self.qmax, self.scale_dtype)

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize_blocks(q, scale, self.block)

    def can_encode(self, m: int) -> bool:
        """Whether rows of m values can be encoded (outlier positions must fit the row and int16)."""
        return not self.outliers or (m < MAX_OUTLIER_WIDTH and self.outliers <= m)

    def payload_parts(self, n: int, m: int, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The parts' dtypes and shapes for n rows of m values of ``dtype``: a function of these alone."""
        codes = (torch.uint8, (-(-n * m // 2),)) if self.nibbles else (torch.int8, (n, m))
        parts = {"q": codes, "scale": (self.scale_dtype, (n, -(-m // self.block)))}
        if self.outliers:
            parts |= {"outlier_pos": (torch.int16, (n, self.outliers)), "outlier_val": (dtype, (n, self.outliers))}
        return parts

    def decode(self, e: Encoded) -> torch.Tensor:
        self._check_codec(e)
        n, m = _dims(e)
        _check_parts(e, self.payload_parts(n, m, e.dtype))
        q = unpack_int4(e.parts["q"], n * m).view(n, m) if self.nibbles else e.parts["q"]
        y = self._dequantize(q, e.parts["scale"])
        rows = hadamard_unrotate(y) if self.rotate else y
        if self.outliers:
            pos = e.parts["outlier_pos"].long()
            if pos.numel() and (pos.min() < 0 or pos.max() >= m):
                raise ValueError(f"{e.codec}: outlier positions outside 0..{m - 1}")
            rows = rows.scatter(1, pos, e.parts["outlier_val"].float())
        return rows.to(e.dtype).reshape(e.shape)


class Int8BlockCodec(_BlockCodec):
    name, qmax, nibbles = "int8", 127, False

    def __init__(self, block: int = 128, rotate: bool = False, outliers: int = 0) -> None:
        super().__init__(block, rotate, outliers, torch.float16 if outliers else torch.float32)


# 16 levels (as multiples of the block's absmax) fitted by Lloyd-Max to Gaussian values divided by the
# absmax of their block of 64, the distribution rotated rows take: for ``int4:levels=gauss``. Symmetric,
# no zero level; fixed decimal constants, so every device decodes the same fp32 values.
GAUSS_LEVELS = (0.0478, 0.1444, 0.2440, 0.3491, 0.4634, 0.5928, 0.7485, 0.9514)
INT4_LEVELS = ("uniform", "gauss")


@functools.lru_cache(maxsize=16)
def _gauss_levels(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 levels, ascending (code k = index k), and the 15 decision thresholds between them."""
    half = torch.tensor(GAUSS_LEVELS, dtype=torch.float32)
    levels = torch.cat((-half.flip(0), half))
    return levels.to(device), ((levels[1:] + levels[:-1]) / 2).to(device)


def gauss_level_error() -> float:
    """The largest |t - level(t)| over t in [-1, 1]: half the widest gap, or 1 - the largest level."""
    lv = sorted([-v for v in GAUSS_LEVELS] + list(GAUSS_LEVELS))
    return max(1.0 - lv[-1], *((b - a) / 2 for a, b in zip(lv, lv[1:], strict=False)))


class Int4HadamardCodec(_BlockCodec):
    """``levels=gauss``: instead of the uniform codes -7..7 times ``absmax/7``, 16 non-uniform levels
    (``GAUSS_LEVELS``, mirrored) times ``s = absmax`` (fp16 scale); the code k in 0..15 is the nearest
    level's index, packed as the uniform codes are. Same bytes. Per element of the rotated row
    ``|y - ŷ| <= gauss_level_error() * s`` (0.1015 s, against s_uniform/2 = absmax/14 = 0.0714 absmax
    for uniform codes): a looser worst case, but a smaller mean-square error on Gaussian-like blocks
    (measured on Gaussian rows: 8.7% against 10.7% relative at block 64, 8.2% against 9.7% at 32)."""

    name, qmax, nibbles = "int4", 7, True
    PARAMS = {"block": int, "rotate": bool, "outliers": int, "levels": str}
    QUIET = {"outliers": 0, "levels": "uniform"}

    def __init__(self, block: int = 32, rotate: bool = True, outliers: int = 0, levels: str = "uniform") -> None:
        if levels not in INT4_LEVELS:
            raise ConfigError(f"levels={levels!r} must be one of {', '.join(INT4_LEVELS)}")
        self.levels = levels
        super().__init__(block, rotate, outliers, torch.float16)

    def _quantize(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.levels == "uniform":
            return super()._quantize(y)
        n, m = y.shape
        nb = -(-m // self.block)
        yp = F.pad(y, (0, nb * self.block - m)).view(n, nb, self.block)
        limit = torch.finfo(self.scale_dtype).max
        scale = yp.abs().amax(-1).clamp(max=limit).to(self.scale_dtype)
        s = scale.float()
        s = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
        _, thresholds = _gauss_levels(y.device)
        k = torch.bucketize((yp / s).contiguous(), thresholds)  # 0..15: index of the nearest level
        q = (k - 8).to(torch.int8)  # -8..7, stored as k by pack_int4
        return q.view(n, nb * self.block)[:, :m].contiguous(), scale.contiguous()

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.levels == "uniform":
            return super()._dequantize(q, scale)
        levels, _ = _gauss_levels(q.device)
        n, m = q.shape
        nb = scale.shape[1]
        values = levels[(q.long() + 8).clamp(0, 15)]
        vp = F.pad(values, (0, nb * self.block - m)).view(n, nb, self.block)
        return (vp * scale.float().unsqueeze(-1)).view(n, nb * self.block)[:, :m]


# ---- low rank (PowerSGD); the helpers also serve engine.collectives ----


@functools.lru_cache(maxsize=64)
def _initial_q(m: int, rank: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(Q_SEED)
    return torch.randn(m, rank, generator=g).to(device)


def start_q(m: int, rank: int, device: torch.device, warm: torch.Tensor | None) -> torch.Tensor:
    """The fp32 ``[m, rank]`` Q a power iteration starts from: the columns of ``warm`` (the last Q of
    the same stream) that are finite and nonzero, the others from a fixed seed. A function of its
    arguments alone, so processes that hold the same ``warm`` start from the same Q."""
    q0 = _initial_q(m, rank, device)
    if warm is not None and warm.shape == q0.shape and warm.device == q0.device:
        usable = torch.isfinite(warm).all(0) & (warm.abs().sum(0) > 0)
        q0 = torch.where(usable, warm, q0)
    return q0


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning those of fp32 ``p [n, r]`` (n >= r): the Q of its reduced QR."""
    return torch.linalg.qr(p)[0]


def lowrank_compresses(n: int, m: int, rank: int, min_rate: float) -> bool:
    """Whether rank-r factors of an ``[n, m]`` matrix are smaller, by ``min_rate``, than the matrix."""
    return (n + m) * rank * min_rate < n * m


V = TypeVar("V")


class KeyedStates(Generic[V]):
    """Per-key state for the ``max_keys`` most recently used keys (thread-safe); ``None`` keeps nothing."""

    def __init__(self, new: Callable[[], V], max_keys: int = 1024) -> None:
        if max_keys < 1:
            raise ConfigError(f"max_keys={max_keys} must be positive")
        self._new = new
        self.max_keys = max_keys
        self._states: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable | None) -> V:
        if key is None:
            return self._new()  # no stream: cold start, nothing kept
        with self._lock:
            state = self._states.pop(key, None)
            if state is None:
                state = self._new()
            self._states[key] = state  # most recently used last
            while len(self._states) > self.max_keys:
                self._states.popitem(last=False)
            return state

    def __len__(self) -> int:
        return len(self._states)


@dataclass
class _LinkState:
    q: torch.Tensor | None = None  # fp32 [m, rank]: the last Q, to warm-start the next call
    residual: torch.Tensor | None = None  # last input minus its decoding (error feedback only)


class LowRankCodec(Codec):
    name = "lowrank"
    PARAMS = {"rank": int, "min_rate": float, "error_feedback": bool}

    def __init__(self, rank: int = 4, min_rate: float = 1.0, error_feedback: bool = False,
                 max_keys: int = 1024) -> None:
        if not 0 < rank <= MAX_RANK:
            raise ConfigError(f"rank={rank} must be in 1..{MAX_RANK}")
        if not (math.isfinite(min_rate) and min_rate > 0):
            raise ConfigError(f"min_rate={min_rate} must be a positive number")
        self.rank, self.min_rate, self.error_feedback = rank, float(min_rate), error_feedback
        self.max_keys = max_keys
        self._states: KeyedStates[_LinkState] = KeyedStates(_LinkState, max_keys)

    def compresses(self, n: int, m: int) -> bool:
        return lowrank_compresses(n, m, self.rank, self.min_rate)

    def encode(self, x: torch.Tensor, *, key: Hashable | None = None) -> Encoded:
        rows = _rows(x, self.name)
        state = self._states.get(key)
        if self.error_feedback and state.residual is not None and state.residual.shape == rows.shape:
            rows = rows + state.residual
        n, m = rows.shape
        if not self.compresses(n, m):
            state.residual = None
            sent = rows.to(x.dtype).reshape(x.shape) if self.error_feedback else x
            return ExactCodec().encode(sent)
        p, q = self._factors(rows, state.q)
        state.q = q
        if self.error_feedback:
            state.residual = rows - p @ q.T
        p, q = _balance(p, q)
        parts = {"p": p.to(x.dtype).contiguous(), "q": q.to(x.dtype).contiguous()}
        return Encoded(self.spec, tuple(x.shape), x.dtype, parts)

    def _factors(self, x: torch.Tensor, warm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One power iteration: orthonormal P [n, r] and Q = X^T P [m, r], P Q^T ~ X."""
        p = orthonormalize(x @ start_q(x.shape[1], self.rank, x.device, warm))
        return p, x.T @ p

    def decode(self, e: Encoded) -> torch.Tensor:
        if e.codec == ExactCodec.name:
            return ExactCodec().decode(e)
        if e.codec.split(":")[0] != self.name:
            raise ValueError(f"payload was encoded with {e.codec!r}; this codec is {self.spec!r}")
        n, m = _dims(e)
        p = e.parts.get("p")
        r = p.shape[-1] if p is not None and p.ndim == 2 else 0
        if not 0 < r <= MAX_RANK:
            raise ValueError(f"{e.codec}: part 'p' missing or malformed")
        _check_parts(e, {"p": (e.dtype, (n, r)), "q": (e.dtype, (m, r))})
        x = e.parts["p"].float() @ e.parts["q"].float().T
        return x.to(e.dtype).reshape(e.shape)


def _balance(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale column j of P by c_j and of Q by 1/c_j so both have norm sqrt(||Q_j||)."""
    norms = q.norm(dim=0)
    c = torch.where(norms > 0, norms.sqrt(), torch.ones_like(norms))
    return p * c, q / c


# ---- registry ----

CODECS: dict[str, type[Codec]] = {c.name: c for c in (ExactCodec, Int8BlockCodec, Int4HadamardCodec, LowRankCodec)}


def _parse_value(codec: str, key: str, text: str, kind: type) -> object:
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        expected = "true/false" if kind is bool else f"an {kind.__name__}" if kind is int else "a number"
        raise ConfigError(f"codec {codec!r}: {key}={text!r} is not {expected}") from None


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs: ``exact,int8:block=64,rotate=false,int4`` -> ``exact``,
    ``int8:block=64,rotate=false``, ``int4``. An item without ':' that looks like ``key=value`` continues
    the previous spec's parameters; ConfigError for empty items and parameters that follow no spec."""
    specs: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            raise ConfigError(f"codec list {text!r} has an empty item")
        if "=" in item and ":" not in item:
            if not specs or ":" not in specs[-1]:
                raise ConfigError(f"codec list {text!r}: parameter {item!r} follows no 'name:' spec")
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def make_codec(spec: str) -> Codec:
    """Build a codec from ``name`` or ``name:key=value,...``, e.g. ``int8:block=64``, ``lowrank:rank=8``."""
    name, _, params = (s.strip() for s in spec.partition(":"))
    cls = CODECS.get(name)
    if cls is None:
        raise ConfigError(f"unknown codec {name!r} in {spec!r}; known: {', '.join(CODECS)}")
    kwargs: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in params.split(","))):
        key, eq, text = (s.strip() for s in item.partition("="))
        if not eq or not text:
            raise ConfigError(f"codec {name!r}: parameter {item!r} must be key=value")
        if key not in cls.PARAMS:
            allowed = ", ".join(cls.PARAMS) or "none"
            raise ConfigError(f"codec {name!r} has no parameter {key!r} (parameters: {allowed})")
        if key in kwargs:
            raise ConfigError(f"codec {name!r}: parameter {key!r} given twice")
        kwargs[key] = _parse_value(name, key, text, cls.PARAMS[key])
    return cls(**kwargs)


def decode(e: Encoded) -> torch.Tensor:
    """Decode any payload by the spec it carries."""
    return make_codec(e.codec).decode(e)
