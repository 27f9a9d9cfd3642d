"""One batch step's attention metadata and the attention over the slot cache.

A step holds B sequences; row b brings ``lengths[b]`` new tokens that start at position ``starts[b]``
(the number of tokens its slot already caches): a decode row brings one token, a prefill row (or a chunk
of a long prompt) several. The tokens are *packed*: the step's activations are [N, hidden] with
N = sum(lengths), row b's tokens at ``offsets[b]:offsets[b + 1]``, so prefill and decode rows share one
step without padding. Linear layers do not care; attention treats the two kinds apart: all one-token rows
attend together in one batched call over their slots, and each longer row attends alone (causally over
its own keys when it starts at 0, over its slot otherwise). The metadata is built once per step and
shared by every layer of the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache


@dataclass(frozen=True)
class Segment:
    """A row with several new tokens: packed tokens [lo, hi) of slot ``slot`` from position ``start``."""

    lo: int
    hi: int
    slot: int
    start: int
    mask: torch.Tensor | None  # [1, 1, T, start + T] bool; None: plain causal over its own keys


@dataclass(kw_only=True)
class StepMeta:
    slots: list[int]
    starts: list[int]
    lengths: list[int]
    positions: torch.Tensor  # [N] int64, position of each packed token
    write_slots: torch.Tensor  # [N] slot of each packed token
    last_index: torch.Tensor  # [B] packed index of each row's last token
    decode_rows: list[int]  # rows with one new token
    decode_index: torch.Tensor | None  # [Bd] their packed token indices; None when every row decodes
    decode_slots: torch.Tensor  # [Bd]
    decode_kv_len: int  # keys the decode rows read: max(start + 1)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, decode_kv_len] bool; None when no masking is needed
    segments: list[Segment]
    extras: dict[str, Any] = field(default_factory=dict)  # per-family step data (e.g. RoPE cos/sin)
    # A decode step of fixed shape for CUDA graphs (engine/graphs.py): every row decodes, every index is a
    # tensor on the device (none is read on the host), and attention reads ``decode_kv_len`` keys of each
    # row's slot, masked beyond the row's position on the device.
    static: bool = False
    sliding_window: int | None = None
    # A static step whose attention runs in the fused kernels (engine/kernels.py), its keys split over
    # ``attn_splits`` programs per row and kv head.
    fused: bool = False
    attn_splits: int = 1

    @property
    def batch(self) -> int:
        return len(self.slots)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @staticmethod
    def build(slots: list[int], starts: list[int], lengths: list[int], *, device: torch.device | str = "cpu",
              sliding_window: int | None = None) -> StepMeta:
        if not (len(slots) == len(starts) == len(lengths)) or not slots:
            raise ValueError(f"step needs equal, non-empty slots/starts/lengths, got "
                             f"{len(slots)}/{len(starts)}/{len(lengths)}")
        if min(lengths) < 1 or min(starts) < 0:
            raise ValueError(f"step lengths must be >= 1 and starts >= 0, got {lengths} and {starts}")
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one step: {slots}")
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        write_slots = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths))
        decode_rows = [b for b, n in enumerate(lengths) if n == 1]
        dec_starts = [starts[b] for b in decode_rows]
        dec_kv = max(dec_starts) + 1 if decode_rows else 0
        dec_mask = None
        if decode_rows and (min(dec_starts) + 1 != dec_kv or (sliding_window is not None and dec_kv > sliding_window)):
            keys = torch.arange(dec_kv)
            query = torch.tensor(dec_starts).unsqueeze(1)  # [Bd, 1]
            dec_mask = keys <= query
            if sliding_window is not None:
                dec_mask &= keys > query - sliding_window
            dec_mask = dec_mask.view(len(decode_rows), 1, 1, dec_kv).to(device)
        segments = []
        for b, n in enumerate(lengths):
            if n > 1:
                segments.append(Segment(offsets[b], offsets[b + 1], slots[b], starts[b],
                                        _segment_mask(starts[b], n, sliding_window, device)))
        every_row_decodes = len(decode_rows) == len(slots)
        return StepMeta(
            slots=list(slots), starts=list(starts), lengths=list(lengths), positions=positions.to(device),
            write_slots=write_slots.to(device),
            last_index=torch.tensor(offsets[1:], device=device) - 1,
            decode_rows=decode_rows,
            decode_index=None if every_row_decodes else torch.tensor([offsets[b] for b in decode_rows],
                                                                     dtype=torch.long, device=device),
            decode_slots=torch.tensor([slots[b] for b in decode_rows], dtype=torch.long, device=device),
            decode_kv_len=dec_kv, decode_mask=dec_mask, segments=segments,
        )


    @staticmethod
    def static_decode(slots: torch.Tensor, positions: torch.Tensor, kv_len: int, *,
                      sliding_window: int | None = None, fused: bool = False, attn_splits: int = 1) -> StepMeta:
        """A decode step over the device tensors ``slots`` and ``positions`` ([B] int64 each, filled in
        before every run): its shapes are fixed, its values are not. ``fused``: attention in the fused
        kernels, which read each row's own length (``kv_len`` then only sizes ``attn_splits``)."""
        batch = int(slots.shape[0])
        return StepMeta(slots=[], starts=[], lengths=[1] * batch, positions=positions, write_slots=slots,
                        last_index=torch.arange(batch, device=slots.device), decode_rows=list(range(batch)),
                        decode_index=None, decode_slots=slots, decode_kv_len=kv_len, decode_mask=None,
                        segments=[], static=True, sliding_window=sliding_window, fused=fused,
                        attn_splits=attn_splits)


def _segment_mask(start: int, length: int, window: int | None, device: torch.device | str) -> torch.Tensor | None:
    if start == 0 and window is None:
        return None
    keys = torch.arange(start + length)
    query = torch.arange(start, start + length).unsqueeze(1)  # [T, 1]
    mask = keys <= query
    if window is not None:
        mask &= keys > query - window
    return mask.view(1, 1, length, start + length).to(device)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
          scale: float | None) -> torch.Tensor:
    # PyTorch's CPU attention kernels are several times slower in bf16/fp16 than in fp32 (a decode step
    # at batch 32 spent 5x longer in attention): compute in fp32 there, as the reference does anyway.
    upcast = q.device.type == "cpu" and q.dtype != torch.float32
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out  # the caller casts back to the step's dtype


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cache: KVCache, layer: int,
                     meta: StepMeta, scale: float | None = None) -> torch.Tensor:
    """Write this step's k/v into the cache, then attend over the filled part.

    q: [N, heads, d]; k, v: [N, kv_heads, d] (packed tokens). Returns [N, heads * d].
    """
    num_tokens, heads, dim = q.shape
    dtype = q.dtype
    if meta.static:
        cache.write(layer, k, v, meta.write_slots, meta.positions)
        return _static_decode_attention(q, cache, layer, meta, scale).reshape(num_tokens, heads * dim)
    if meta.batch == 1:  # one sequence: its positions are one contiguous run
        cache.write_run(layer, k.transpose(0, 1), v.transpose(0, 1), meta.slots[0], meta.starts[0])
    else:
        cache.write(layer, k, v, meta.write_slots, meta.positions)
    if meta.decode_index is None and not meta.segments:  # decode only: one batched call
        return _decode_attention(q, cache, layer, meta, scale).to(dtype).reshape(num_tokens, heads * dim)
    out = q.new_empty(num_tokens, heads, dim)
    if meta.decode_rows:
        out[meta.decode_index] = _decode_attention(q[meta.decode_index], cache, layer, meta, scale).to(dtype)
    for seg in meta.segments:
        qs = q[seg.lo:seg.hi].transpose(0, 1).unsqueeze(0)  # [1, heads, T, d]
        if seg.mask is None:  # a prompt from position 0: its own k/v are the whole context
            keys, values = (t[seg.lo:seg.hi].transpose(0, 1).unsqueeze(0) for t in (k, v))
        else:
            keys, values = cache.read(layer, seg.slot, seg.start + seg.hi - seg.lo)
        o = _sdpa(qs, keys, values, seg.mask, seg.mask is None, scale)  # [1, heads, T, d]
        out[seg.lo:seg.hi] = o[0].transpose(0, 1).to(dtype)
    return out.reshape(num_tokens, heads * dim)


def fused_decode_attention(qkv: torch.Tensor, *, cache: KVCache, layer: int, meta: StepMeta, num_heads: int,
                           num_kv_heads: int, head_dim: int, rotary: bool, scale: float | None = None) -> torch.Tensor:
    """A fused static decode step's attention (engine/kernels.py): RoPE and the cache write in one kernel,
    attention over each row's slot in place in one (or two, with split keys). qkv: [B, (heads + 2 *
    kv_heads) * d] from the fused projection. Returns [B, heads * d]."""
    from engine import kernels

    k_cache, v_cache = cache.k[layer], cache.v[layer]
    q = kernels.rope_and_write(qkv, meta.extras["rope"] if rotary else None, meta.positions, meta.write_slots,
                               k_cache, v_cache, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    return kernels.decode_attention(q, k_cache, v_cache, meta.decode_slots, meta.positions,
                                    scale=scale if scale is not None else head_dim ** -0.5,
                                    window=meta.sliding_window, splits=meta.attn_splits)


def _decode_attention(q: torch.Tensor, cache: KVCache, layer: int, meta: StepMeta,
                      scale: float | None) -> torch.Tensor:
    """The one-token rows: q [Bd, heads, d] -> [Bd, heads, d]."""
    rows = len(meta.decode_rows)
    num_slots = cache.spec.num_slots
    if rows == 1:
        keys, values = cache.read(layer, meta.slots[meta.decode_rows[0]], meta.decode_kv_len)
    elif 2 * rows >= num_slots:
        # Most slots decode: attend over the cache in place, one query row per slot (idle slots get a zero
        # query whose output is dropped), instead of gathering the rows' keys and values: about 40% less
        # time per layer at 32 rows on CPU.
        mask = meta.extras.get("decode_slot_mask")
        if mask is None:
            mask = meta.extras["decode_slot_mask"] = _slot_mask(meta, num_slots, q.device)
        spread = q.new_zeros(num_slots, q.shape[1], 1, q.shape[2])
        spread[meta.decode_slots] = q.unsqueeze(2)
        keys, values = cache.read(layer, None, meta.decode_kv_len)  # views of every slot
        return _sdpa(spread, keys, values, mask, False, scale)[meta.decode_slots].squeeze(2)
    else:
        keys, values = cache.read(layer, meta.decode_slots, meta.decode_kv_len)  # [Bd, kv_heads, L, d]
    out = _sdpa(q.unsqueeze(2), keys, values, meta.decode_mask, False, scale)  # [Bd, heads, 1, d]
    return out.squeeze(2)


def _slot_mask(meta: StepMeta, num_slots: int, device: torch.device) -> torch.Tensor:
    """[num_slots, 1, 1, decode_kv_len]: each decoding slot's keys; an idle slot sees key 0 only."""
    mask = torch.zeros(num_slots, meta.decode_kv_len, dtype=torch.bool)
    mask[:, 0] = True
    row_mask = (meta.decode_mask[:, 0, 0].cpu() if meta.decode_mask is not None
                else torch.ones(len(meta.decode_rows), meta.decode_kv_len, dtype=torch.bool))
    mask[meta.decode_slots.cpu()] = row_mask
    return mask.view(num_slots, 1, 1, meta.decode_kv_len).to(device)


def _static_decode_attention(q: torch.Tensor, cache: KVCache, layer: int, meta: StepMeta,
                             scale: float | None) -> torch.Tensor:
    """Decode attention with no host work (CUDA graphs): q [B, heads, d] -> [B, heads, d].

    Each row reads ``decode_kv_len`` keys of its slot; keys past its position (or outside its sliding
    window) get a -inf bias, built on the device once per step. Scores and softmax in fp32 (16-bit scores
    of magnitude ~10 are off by ~0.04, several percent in each probability), probabilities times values in
    the storage dtype."""
    rows, heads, dim = q.shape
    bias = meta.extras.get("static_decode_bias")
    if bias is None:  # built once per step (and recorded once in a graph), shared by every layer
        keys = torch.arange(meta.decode_kv_len, device=q.device)
        query = meta.positions.unsqueeze(1)  # [B, 1]
        allowed = keys <= query
        if meta.sliding_window is not None:
            allowed &= keys > query - meta.sliding_window
        bias = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))
        bias = meta.extras["static_decode_bias"] = bias[:, None, None, :]  # [B, 1, 1, L]
    keys, values = cache.read(layer, meta.decode_slots, meta.decode_kv_len)  # [B, kv_heads, L, d]
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    flat = rows * kv_heads
    qg = q.reshape(flat, group, dim).float()  # query heads grouped by the kv head they share
    scores = torch.baddbmm(bias.expand(rows, kv_heads, group, length).reshape(flat, group, length), qg,
                           keys.reshape(flat, length, dim).transpose(1, 2).float(),
                           alpha=scale if scale is not None else dim ** -0.5)  # [B * kv_heads, g, L]
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.bmm(probs, values.reshape(flat, length, dim)).view(rows, heads, dim)
