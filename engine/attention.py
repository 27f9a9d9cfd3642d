"""One batch step's attention metadata and the attention over the slot cache.

A step holds B sequences; row b brings ``lengths[b]`` new tokens (prefill or decode) that start at
position ``starts[b]`` (the number of tokens its slot already caches). Inputs are right-padded to
T = max(lengths). The metadata is built once per step and shared by every layer of the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache


@dataclass(kw_only=True)
class StepMeta:
    slots: torch.Tensor  # [B] int64
    starts: torch.Tensor  # [B] int64, tokens already cached per row
    lengths: torch.Tensor  # [B] int64, new tokens per row
    positions: torch.Tensor  # [B, T] int64 (padded entries repeat the last valid position)
    write_slots: torch.Tensor  # [N] slot of each valid new token
    write_positions: torch.Tensor  # [N] position of each valid new token
    valid: torch.Tensor | None  # [B, T] bool, None when every entry is valid
    kv_len: int  # keys to read: max(starts + lengths)
    mask: torch.Tensor | None  # [B, 1, T, kv_len] bool, None when plain causal/no mask works
    is_causal: bool  # use SDPA's causal mask (single prefill from position 0, no window)
    single_slot: int | None  # the slot when B == 1 (reads become views)
    single_start: int | None  # its first new position when B == 1 (writes become slice copies)
    extras: dict[str, Any] = field(default_factory=dict)  # per-family step data (e.g. RoPE cos/sin)

    @property
    def batch(self) -> int:
        return int(self.slots.shape[0])

    @property
    def width(self) -> int:
        return int(self.positions.shape[1])

    def last_index(self) -> torch.Tensor:
        """Index of each row's last valid token: [B]."""
        return self.lengths - 1

    @staticmethod
    def build(slots: list[int], starts: list[int], lengths: list[int], *, device: torch.device | str = "cpu",
              sliding_window: int | None = None) -> StepMeta:
        if not (len(slots) == len(starts) == len(lengths)) or not slots:
            raise ValueError(f"step needs equal, non-empty slots/starts/lengths, got "
                             f"{len(slots)}/{len(starts)}/{len(lengths)}")
        if min(lengths) < 1 or min(starts) < 0:
            raise ValueError(f"step lengths must be >= 1 and starts >= 0, got {lengths} and {starts}")
        width = max(lengths)
        batch = len(slots)
        t_slots = torch.tensor(slots, dtype=torch.long)
        t_starts = torch.tensor(starts, dtype=torch.long)
        t_lengths = torch.tensor(lengths, dtype=torch.long)
        offsets = torch.arange(width)
        valid = offsets.unsqueeze(0) < t_lengths.unsqueeze(1)  # [B, T]
        positions = t_starts.unsqueeze(1) + torch.minimum(offsets.unsqueeze(0), (t_lengths - 1).unsqueeze(1))
        all_valid = bool(valid.all())
        kv_len = int((t_starts + t_lengths).max())
        write_slots = t_slots.unsqueeze(1).expand(batch, width)[valid]
        write_positions = positions[valid]
        plain_causal = batch == 1 and starts[0] == 0 and sliding_window is None
        no_mask = width == 1 and all(s + 1 == kv_len for s in starts) and (
            sliding_window is None or kv_len <= sliding_window)
        mask = None
        if not (plain_causal or no_mask):
            keys = torch.arange(kv_len)
            query_pos = positions.unsqueeze(-1)  # [B, T, 1]
            mask = keys <= query_pos
            if sliding_window is not None:
                mask &= keys > query_pos - sliding_window
            mask = mask.unsqueeze(1).to(device)  # [B, 1, T, kv_len]
        return StepMeta(
            slots=t_slots.to(device), starts=t_starts.to(device), lengths=t_lengths.to(device),
            positions=positions.to(device), write_slots=write_slots.to(device),
            write_positions=write_positions.to(device), valid=None if all_valid else valid.to(device),
            kv_len=kv_len, mask=mask, is_causal=plain_causal and width > 1,
            single_slot=slots[0] if batch == 1 else None, single_start=starts[0] if batch == 1 else None,
        )


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cache: KVCache, layer: int,
                     meta: StepMeta, scale: float | None = None) -> torch.Tensor:
    """Write this step's k/v into the cache, then attend over the filled part.

    q: [B, heads, T, d]; k, v: [B, kv_heads, T, d]. Returns [B, T, heads * d].
    """
    batch, heads, width, dim = q.shape
    kv_heads = k.shape[1]
    if meta.single_slot is not None:  # one sequence: its new positions are one contiguous run
        cache.write_run(layer, k[0], v[0], meta.single_slot, meta.single_start)
    else:
        k_tok = k.transpose(1, 2)  # [B, T, kv_heads, d]
        v_tok = v.transpose(1, 2)
        if meta.valid is None:
            k_tok, v_tok = k_tok.reshape(-1, kv_heads, dim), v_tok.reshape(-1, kv_heads, dim)
        else:
            k_tok, v_tok = k_tok[meta.valid], v_tok[meta.valid]
        cache.write(layer, k_tok, v_tok, meta.write_slots, meta.write_positions)
    if meta.is_causal:
        keys, values = k, v  # prefill of one sequence from position 0: its own k/v are the whole context
    else:
        slot = meta.single_slot if meta.single_slot is not None else meta.slots
        keys, values = cache.read(layer, slot, meta.kv_len)  # [B, kv_heads, kv_len, d]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.mask, is_causal=meta.is_causal,
                                         scale=scale, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).reshape(batch, width, heads * dim)
