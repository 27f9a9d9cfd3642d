"""All-reduce strategies for tensor-parallel groups: exact, block-quantized in two steps, and low rank.

The row-parallel linears and the vocabulary-parallel embedding end in an all-reduce of partial sums
``[..., hidden]``. When a tensor-parallel group spans nodes over an ordinary network, an
:class:`AllReducer` can compress it with the codecs of :mod:`engine.codecs` (specs as ``make_codec``
parses them; ``make_reducer`` builds one). ``all_reduce(x, group, key=...)`` returns the sum over the
group's ranks in x's dtype, shape and device. All arithmetic is in fp32. Whether a call compresses is
decided from the shape and dtype alone, so every rank takes the same path. Every path returns the
same bits on every rank, given the same device type and torch build: past the collectives, the ranks
run the same deterministic kernels on the same bits (gloo's and NCCL's all-reduce reduce each chunk
once and pass the result on, so their results are the same bits everywhere).

Strategies (x as ``[n, m]``, m = last dimension; w ranks; ``x_j``: rank j's partial, ``S = sum_j x_j``):

- ``exact``: ``dist.all_reduce`` in place (gloo on CPU, NCCL on GPU). Its result is the backend's.
- ``int8...``, ``int4...`` (:class:`QuantizedAllReduce`): two steps, rows split over the ranks as
  ``torch.tensor_split`` does (``row_shards``: the first ``n mod w`` ranks own one row more; with
  n < w some own none, and nothing is sent for them: no padding rows cross the wire).

  1. Reduce-scatter: each rank encodes every other rank's row shard of its partial and sends it to
     that rank (``all_to_all_single`` of uint8 payloads, which gloo and NCCL both implement); the
     owner decodes them and adds them to its own shard, which it keeps exact:
     ``s1 = x_o + sum_{j != o} D(E(x_j))`` in fp32.
  2. All-gather: the owner encodes ``s1`` (fp32; outlier values travel in fp32) and sends the payload
     to every other rank (``all_to_all_single`` again); every rank, the owner included, decodes the
     same bytes, so the result is bitwise identical everywhere: ``y = D(E(s1))``.

  Payload: the codec's parts, each flattened to bytes, in order of decreasing element size (then
  name), so that each starts aligned for its dtype; zero bytes pad the payload to a multiple of 8. The
  parts' sizes follow from (rows, m, dtype) (``payload_parts``): nothing is exchanged beforehand and
  nothing is pickled. Bytes per row: as the codec's (``engine.codecs``), plus at most 7 per payload.

  Bounds, from the codec's (``c = sqrt(block) / (2 * qmax)``: 4.45% for int8 blocks of 128, 40% for
  int4 blocks of 32; ``A_b(v)``: absmax of v's block b; ``v'``: v without its outliers, which travel
  exactly; fp32 rounding aside), per row owned by rank o:

  - int8, ``rotate=false``, per element (block b): ``|y - S| <= s_b(s1)/2 + sum_{j != o} s_b(x_j')/2``
    with ``s_b(v) = A_b(v)/127`` and ``A_b(s1) <= A_b(S) + sum_{j != o} A_b(x_j')/254``, so
    ``|y - S| <= (A_b(S) + (1 + 1/254) * sum_{j != o} A_b(x_j')) / 254``.
  - rotated (int8 ``rotate=true``, int4), in norm: ``||y - S|| <= c ||s1'|| + c sum_{j != o} ||x_j'||
    <= c ||S'|| + c (1 + c) sum_{j != o} ||x_j'||`` (dropping s1's k largest magnitudes leaves at
    most what dropping any k positions leaves, so ``||s1'|| <= ||S'|| + ||s1 - S||``).

  Both scale with the partials, not with their sum: partials that cancel leave a large relative
  error on a small sum. Typically (independent Gaussian partials, the codec's typical relative error
  e: int8 0.65%, int4 10%): ``e sqrt((2w - 1)/w)`` of the sum, 1.22x e at w=2, 1.29x at w=3. Bytes:
  2 (w-1)/w of the payload per rank, as an exact ring all-reduce moves of the raw values, so the
  codec's ratio (measured against bf16 at m=576: int8 1.93x, with ``rotate=true,outliers=3`` 1.92x,
  int4 3.56x).
- ``lowrank:rank=r,min_rate=k`` (:class:`PowerSGDAllReduce`): one PowerSGD power iteration on the
  sum, with Q warm-started per ``key``: ``P = all_reduce(x_j Q)`` ``[n, r]``, orthonormalized by fp32
  QR; ``Q = all_reduce(x_j^T P)`` ``[m, r]``; ``y = P Q^T``, the projection of S on span(P): exact
  (to fp32 rounding) when rank(S) <= r, already on the first call. The first Q comes from a fixed
  seed, later ones are the last all-reduced Q of the same key (``engine.codecs.start_q``), so they are
  identical on every rank; the 1024 most recently used keys are kept. Compresses only where
  ``(n+m) r min_rate < n m``, else exact. The condition counts elements, and P and Q travel in fp32
  (the backend sums them): for bf16 inputs the byte ratio is half the element ratio (``min_rate=2``
  keeps it above 1). Error feedback is not offered: activations are used once.

Size policy: tensors of fewer than ``min_elements`` elements (default ``DEFAULT_MIN_ELEMENTS``) take the
exact path (see there). Non-finite values spoil their block (Hadamard group; low-rank message).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.codecs import (
    Encoded,
    ExactCodec,
    Int4HadamardCodec,
    Int8BlockCodec,
    KeyedStates,
    LowRankCodec,
    lowrank_compresses,
    make_codec,
    orthonormalize,
    start_q,
)
from engine.errors import ConfigError

# Below 64 Ki elements (128 KiB in bf16, which a 10 Gbit/s link carries in about 100 us) a message is
# latency-bound: the compressed paths' second round trip and their encode/decode kernels cost more
# than the bytes they save. Decode steps (a few tokens of hidden states) thus stay exact, as
# DESIGN.md asks; prefill chunks of hundreds of tokens compress.
DEFAULT_MIN_ELEMENTS = 1 << 16
ALIGN = 8  # payloads are padded to a multiple of this, so every part starts aligned for its dtype

BlockCodec = Int8BlockCodec | Int4HadamardCodec


@dataclass
class ReduceStats:
    """Counters of one rank. Bytes are what this rank puts on the wire: for the exact path (and as
    ``exact_bytes``, the reference for every call), a bandwidth-optimal ring's ``2 (w-1)/w`` of the
    tensor's bytes; for the compressed paths, the payloads it actually sends."""

    compressed_calls: int = 0
    exact_calls: int = 0
    bytes_sent: int = 0
    exact_bytes: int = 0  # what exact all-reduces of the same tensors would have sent

    @property
    def ratio(self) -> float:
        """How many times fewer bytes than exact all-reduces (1.0 before any call)."""
        return self.exact_bytes / self.bytes_sent if self.bytes_sent else 1.0


def ring_bytes(nbytes: int, world: int) -> int:
    """Bytes each rank sends in a ring (or direct) all-reduce of ``nbytes``: reduce-scatter plus all-gather."""
    return 2 * (world - 1) * nbytes // world


class AllReducer(ABC):
    """Sums a tensor over a process group's ranks; compressed where ``compresses`` says so, else exact."""

    spec: str

    def __init__(self, *, min_elements: int = DEFAULT_MIN_ELEMENTS) -> None:
        if min_elements < 0:
            raise ConfigError(f"min_elements={min_elements} must be >= 0")
        self.min_elements = min_elements
        self.stats = ReduceStats()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, min_elements={self.min_elements})"

    def all_reduce(self, x: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                   key: Hashable | None = None) -> torch.Tensor:
        """The sum of ``x`` over the group's ranks. The exact path reduces ``x`` in place (and returns
        it); a compressed one leaves ``x`` as it is. ``key`` names the call site (a stream of calls,
        e.g. one layer's projection) for strategies that keep state per site."""
        world = dist.get_world_size(group)
        if world == 1:
            return x
        self.stats.exact_bytes += ring_bytes(x.numel() * x.element_size(), world)
        if not self.compresses(tuple(x.shape), x.dtype):
            self.stats.exact_calls += 1
            self.stats.bytes_sent += ring_bytes(x.numel() * x.element_size(), world)
            dist.all_reduce(x, group=group)
            return x
        self.stats.compressed_calls += 1
        return self._reduce(x, group, dist.get_rank(group), world, key)

    def compresses(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether a tensor of this shape and dtype takes the compressed path (the same on every rank)."""
        numel = math.prod(shape)
        return (dtype.is_floating_point and len(shape) > 0 and numel > 0 and numel >= self.min_elements
                and self._compresses(numel // shape[-1], shape[-1]))

    @abstractmethod
    def _compresses(self, n: int, m: int) -> bool: ...

    @abstractmethod
    def _reduce(self, x: torch.Tensor, group: dist.ProcessGroup | None, rank: int, world: int,
                key: Hashable | None) -> torch.Tensor: ...


class ExactAllReduce(AllReducer):
    """``dist.all_reduce`` for every tensor."""

    spec = "exact"

    def _compresses(self, n: int, m: int) -> bool:
        return False

    def _reduce(self, x: torch.Tensor, group: dist.ProcessGroup | None, rank: int, world: int,
                key: Hashable | None) -> torch.Tensor:
        raise AssertionError("the exact reducer never compresses")


# ---- block-quantized payloads as bytes ----


def payload_layout(codec: BlockCodec, n: int, m: int, dtype: torch.dtype
                   ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The parts of an encoding of n rows of m values of ``dtype``, in payload order."""
    parts = codec.payload_parts(n, m, dtype)
    return sorted(((name, dt, shape) for name, (dt, shape) in parts.items()),
                  key=lambda p: (-p[1].itemsize, p[0]))


def payload_nbytes(codec: BlockCodec, n: int, m: int, dtype: torch.dtype) -> int:
    """The length of a payload of n rows (0 for none), padded to a multiple of ``ALIGN``."""
    if n == 0:
        return 0
    raw = sum(math.prod(shape) * dt.itemsize for _, dt, shape in payload_layout(codec, n, m, dtype))
    return -(-raw // ALIGN) * ALIGN


def encoded_to_bytes(e: Encoded, codec: BlockCodec) -> torch.Tensor:
    """An encoding of ``[n, m]`` as one flat uint8 tensor on its device (no pickle, no copy to the host)."""
    n, m = e.shape
    pieces = [e.parts[name].reshape(-1).view(torch.uint8) for name, _, _ in payload_layout(codec, n, m, e.dtype)]
    raw = sum(p.numel() for p in pieces)
    pad = -raw % ALIGN
    if pad:
        pieces.append(torch.zeros(pad, dtype=torch.uint8, device=pieces[0].device))
    return torch.cat(pieces)


def encoded_from_bytes(buf: torch.Tensor, codec: BlockCodec, n: int, m: int, dtype: torch.dtype) -> Encoded:
    """The inverse of ``encoded_to_bytes``: views into ``buf`` (which must start 8-byte aligned)."""
    if buf.numel() != payload_nbytes(codec, n, m, dtype):
        raise ValueError(f"{codec.spec}: payload of {buf.numel()} bytes for {n} rows of {m}, "
                         f"expected {payload_nbytes(codec, n, m, dtype)}")
    parts, offset = {}, 0
    for name, dt, shape in payload_layout(codec, n, m, dtype):
        size = math.prod(shape) * dt.itemsize
        parts[name] = buf[offset:offset + size].view(dt).view(shape)
        offset += size
    return Encoded(codec.spec, (n, m), dtype, parts)


def row_shards(n: int, world: int) -> list[tuple[int, int]]:
    """The [start, stop) rows each rank owns in the two-step scheme (``torch.tensor_split``'s split)."""
    return [(_split_start(n, world, r), _split_start(n, world, r + 1)) for r in range(world)]


def _split_start(n: int, world: int, r: int) -> int:
    base, extra = divmod(n, world)  # the first `extra` ranks own one row more
    return r * base + min(r, extra)


class QuantizedAllReduce(AllReducer):
    """Two-step (reduce-scatter, all-gather) all-reduce with a block codec; see the module docstring."""

    def __init__(self, codec: BlockCodec, *, min_elements: int = DEFAULT_MIN_ELEMENTS) -> None:
        if not isinstance(codec, (Int8BlockCodec, Int4HadamardCodec)):
            raise ConfigError(f"QuantizedAllReduce takes an int8 or int4 codec, got {codec.spec!r}")
        super().__init__(min_elements=min_elements)
        self.codec = codec
        self.spec = codec.spec

    def _compresses(self, n: int, m: int) -> bool:
        return self.codec.can_encode(m)

    def _reduce(self, x: torch.Tensor, group: dist.ProcessGroup | None, rank: int, world: int,
                key: Hashable | None) -> torch.Tensor:
        m = x.shape[-1]
        rows = x.reshape(-1, m)  # [n, m] in x's dtype
        shards = row_shards(rows.shape[0], world)
        counts = [stop - start for start, stop in shards]
        start, stop = shards[rank]
        # Step 1: rank j's shard of my partial goes to j; I receive every rank's copy of my shard.
        sizes_out = [0 if j == rank else payload_nbytes(self.codec, counts[j], m, x.dtype) for j in range(world)]
        sizes_in = [0 if j == rank else payload_nbytes(self.codec, counts[rank], m, x.dtype) for j in range(world)]
        sent = [self._encode(rows[a:b]) for j, (a, b) in enumerate(shards) if j != rank and b > a]
        received = self._exchange(sent, sizes_in, sizes_out, x.device, group)
        mine = rows[start:stop].to(torch.float32, copy=True)  # [rows of mine, m]: my own partial stays exact
        for chunk in received.split(sizes_in):
            if chunk.numel():
                mine += self.codec.decode(encoded_from_bytes(chunk, self.codec, counts[rank], m, x.dtype))
        # Step 2: my reduced shard goes to every rank; all decode the same bytes, the owner included.
        own = self._encode(mine) if counts[rank] else torch.empty(0, dtype=torch.uint8, device=x.device)
        sizes_out2 = [0 if j == rank else own.numel() for j in range(world)]
        sizes_in2 = [0 if j == rank else payload_nbytes(self.codec, counts[j], m, torch.float32)
                     for j in range(world)]
        gathered = list(self._exchange([own] * (world - 1), sizes_in2, sizes_out2, x.device, group).split(sizes_in2))
        gathered[rank] = own
        out = [self.codec.decode(encoded_from_bytes(chunk, self.codec, counts[j], m, torch.float32))
               for j, chunk in enumerate(gathered) if counts[j]]
        self.stats.bytes_sent += sum(sizes_out) + sum(sizes_out2)
        return torch.cat(out).to(x.dtype).reshape(x.shape)

    def _encode(self, rows: torch.Tensor) -> torch.Tensor:
        return encoded_to_bytes(self.codec.encode(rows), self.codec)

    @staticmethod
    def _exchange(sent: list[torch.Tensor], sizes_in: list[int], sizes_out: list[int], device: torch.device,
                  group: dist.ProcessGroup | None) -> torch.Tensor:
        """``all_to_all_single`` of uint8 payloads: ``sent`` in rank order (none to this rank)."""
        payload = torch.cat(sent) if sent else torch.empty(0, dtype=torch.uint8, device=device)
        received = torch.empty(sum(sizes_in), dtype=torch.uint8, device=device)
        dist.all_to_all_single(received, payload, sizes_in, sizes_out, group=group)
        return received


# ---- low rank ----


@dataclass
class _WarmQ:
    q: torch.Tensor | None = None  # fp32 [m, rank]: the last all-reduced Q, identical on every rank


class PowerSGDAllReduce(AllReducer):
    """One PowerSGD power iteration on the sum, warm-started per key; see the module docstring."""

    def __init__(self, rank: int = 4, min_rate: float = 1.0, *, min_elements: int = DEFAULT_MIN_ELEMENTS,
                 max_keys: int = 1024) -> None:
        super().__init__(min_elements=min_elements)
        codec = LowRankCodec(rank=rank, min_rate=min_rate, max_keys=max_keys)  # validates the parameters
        self.rank, self.min_rate = codec.rank, codec.min_rate
        self.spec = f"lowrank:rank={self.rank},min_rate={self.min_rate}"
        self._states: KeyedStates[_WarmQ] = KeyedStates(_WarmQ, max_keys)

    def _compresses(self, n: int, m: int) -> bool:
        return lowrank_compresses(n, m, self.rank, self.min_rate)

    def _reduce(self, x: torch.Tensor, group: dist.ProcessGroup | None, rank: int, world: int,
                key: Hashable | None) -> torch.Tensor:
        m = x.shape[-1]
        rows = x.reshape(-1, m).float()  # [n, m]: this rank's partial
        state = self._states.get(key)
        p = rows @ start_q(m, self.rank, rows.device, state.q)  # [n, r]
        dist.all_reduce(p, group=group)  # S Q
        p = orthonormalize(p)
        q = rows.T @ p  # [m, r]
        dist.all_reduce(q, group=group)  # S^T P
        state.q = q
        self.stats.bytes_sent += ring_bytes((p.numel() + q.numel()) * 4, world)
        return (p @ q.T).to(x.dtype).reshape(x.shape)


def make_reducer(spec: str, *, min_elements: int = DEFAULT_MIN_ELEMENTS) -> AllReducer:
    """An all-reducer for a codec spec as ``make_codec`` parses it: ``exact``, ``int8``,
    ``int8:rotate=true,outliers=3``, ``int4``, ``lowrank:rank=8``, ... (ConfigError if it is bad)."""
    try:
        codec = make_codec(spec)
    except ConfigError as e:
        raise ConfigError(f"all-reduce codec {spec!r}: {e}") from None
    if isinstance(codec, ExactCodec):
        return ExactAllReduce(min_elements=min_elements)
    if isinstance(codec, (Int8BlockCodec, Int4HadamardCodec)):
        return QuantizedAllReduce(codec, min_elements=min_elements)
    if isinstance(codec, LowRankCodec):
        if codec.error_feedback:
            raise ConfigError(f"all-reduce codec {spec!r}: error feedback is not offered for all-reduce "
                              f"(activations are used once)")
        return PowerSGDAllReduce(codec.rank, codec.min_rate, min_elements=min_elements)
    raise ConfigError(f"codec {spec!r} has no all-reduce")
