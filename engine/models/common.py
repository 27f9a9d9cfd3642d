"""Pieces shared by the model families: norms, rotary embeddings, attention and MLP blocks, and the
helpers that load one rank's shard of a checkpoint tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import StepMeta, cached_attention, fused_decode_attention
from engine.config import ModelConfig, RopeConfig
from engine.kv_cache import KVCache
from engine.parallel import ParallelLMHead, ShardedLinear, TPGroup, kv_head_range
from engine.weights import WeightReader

ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}


def load_into(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if param.shape != value.shape:
        raise ValueError(f"{name}: checkpoint shard has shape {tuple(value.shape)}, "
                         f"the model expects {tuple(param.shape)}")
    param.copy_(value)


def read_rows(reader: WeightReader, name: str, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
    return reader.get_slice(name, 0, start, stop, dtype=like.dtype, device=like.device)


def read_cols(reader: WeightReader, name: str, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
    return reader.get_slice(name, 1, start, stop, dtype=like.dtype, device=like.device)


def read_full(reader: WeightReader, name: str, like: torch.Tensor) -> torch.Tensor:
    return reader.get(name, dtype=like.dtype, device=like.device)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.fused = False  # engine/kernels.py rms_norm (set by StageModel.optimize_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dim() == 2:
            from engine.kernels import rms_norm

            return rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 or x.is_cuda:
            # One fused op (on CUDA it accumulates in fp32 and rounds once: within 16-bit error of the
            # reference's two roundings, and a decode step's 2 norms per layer are 2 kernels, not 14).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in fp32 whatever the storage dtype, as the reference implementation does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def load(self, reader: WeightReader, prefix: str) -> None:
        load_into(self.weight, read_full(reader, f"{prefix}.weight", self.weight), f"{prefix}.weight")


class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(dim, eps=1e-5, dtype=dtype, device=device)
        self.requires_grad_(False)

    def load(self, reader: WeightReader, prefix: str) -> None:
        load_into(self.weight, read_full(reader, f"{prefix}.weight", self.weight), f"{prefix}.weight")
        load_into(self.bias, read_full(reader, f"{prefix}.bias", self.bias), f"{prefix}.bias")


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind != "llama3":
        return inv_freq
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Computes cos/sin for a step's positions once; every layer of the stage reuses them."""

    def __init__(self, rope: RopeConfig, head_dim: int, *, device: torch.device | str) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim).to(device), persistent=False)

    def prepare(self, meta: StepMeta, dtype: torch.dtype) -> None:
        freqs = meta.positions.unsqueeze(-1).float() * self.inv_freq  # [N, d/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [N, 1, d]: broadcast over heads
        sin = emb.sin()
        sin[..., : sin.shape[-1] // 2].neg_()  # the rotation's sign, folded in once per step
        meta.extras["rope"] = (emb.cos().to(dtype), sin.to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) and ``signed_sin`` carries the
    minus sign: three kernels per layer instead of five."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Attention(nn.Module):
    """Self-attention over the slot cache with heads split across the tensor-parallel group.

    q/k/v are one fused column-parallel projection; the output projection is row-parallel, its
    all-reduce under ``reduce_key`` (unique in the model, e.g. ``"layers.3.attn"``).
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup, *, layer: int, rotary: bool, dtype: torch.dtype,
                 device: torch.device | str, names: tuple[str, str, str, str],
                 reduce_key: str | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.names = names
        self.head_dim = cfg.head_dim
        self.num_heads = tp.split(cfg.total_num_heads, "num_attention_heads")
        self.kv_heads = kv_head_range(cfg.total_num_kv_heads, tp)
        self.num_kv_heads = self.kv_heads[1] - self.kv_heads[0]
        self.head_start = tp.rank * self.num_heads
        q_out, kv_out = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.split_sizes = (q_out, kv_out, kv_out)
        self.qkv = ShardedLinear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.qkv_bias, tp=tp,
                                 dtype=dtype, device=device)
        self.o_proj = ShardedLinear(q_out, cfg.hidden_size, bias=cfg.o_bias, tp=tp, reduce_results=True,
                                    reduce_key=reduce_key, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, meta: StepMeta, cache: KVCache, residual: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Attention of ``x`` [N, hidden], plus ``residual`` if given (added by the output projection)."""
        if meta.fused:
            out = fused_decode_attention(self.qkv(x), cache=cache, layer=self.layer, meta=meta,
                                         num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                         head_dim=self.head_dim, rotary=self.rotary)
            return self.o_proj(out, residual)
        qkv = self.qkv(x).view(x.shape[0], -1, self.head_dim)  # [N, heads + 2 * kv_heads, d]
        rotated = self.num_heads + self.num_kv_heads
        qk = qkv[:, :rotated]
        if self.rotary:  # q and k in one pass
            qk = apply_rotary(qk, *meta.extras["rope"])
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        out = cached_attention(q, k, qkv[:, rotated:], cache=cache, layer=self.layer, meta=meta)
        return self.o_proj(out, residual)

    def load(self, reader: WeightReader, prefix: str) -> None:
        qn, kn, vn, on = (f"{prefix}.{n}" for n in self.names)
        d = self.head_dim
        q_rows = (self.head_start * d, (self.head_start + self.num_heads) * d)
        kv_rows = (self.kv_heads[0] * d, self.kv_heads[1] * d)
        w = self.qkv.weight
        parts = [read_rows(reader, f"{qn}.weight", *q_rows, w), read_rows(reader, f"{kn}.weight", *kv_rows, w),
                 read_rows(reader, f"{vn}.weight", *kv_rows, w)]
        load_into(w, torch.cat(parts), f"{prefix} qkv weight")
        if self.qkv.bias is not None:
            b = self.qkv.bias
            parts = [read_rows(reader, f"{qn}.bias", *q_rows, b), read_rows(reader, f"{kn}.bias", *kv_rows, b),
                     read_rows(reader, f"{vn}.bias", *kv_rows, b)]
            load_into(b, torch.cat(parts), f"{prefix} qkv bias")
        load_into(self.o_proj.weight, read_cols(reader, f"{on}.weight", *q_rows, self.o_proj.weight),
                  f"{on}.weight")
        if self.o_proj.bias is not None:
            load_into(self.o_proj.bias, read_full(reader, f"{on}.bias", self.o_proj.bias), f"{on}.bias")


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate/up fused column-parallel and down row-parallel (its
    all-reduce under ``reduce_key``)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, *, dtype: torch.dtype, device: torch.device | str,
                 reduce_key: str | None = None) -> None:
        super().__init__()
        self.inter = tp.split(cfg.intermediate_size, "intermediate_size")
        self.start = tp.rank * self.inter
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.hidden_act = cfg.hidden_act
        self.fused_act = False  # silu(gate) * up in one kernel (engine/kernels.py): see use_fused_kernels
        self.gate_up = ShardedLinear(cfg.hidden_size, 2 * self.inter, bias=cfg.mlp_bias, tp=tp,
                                     dtype=dtype, device=device)
        self.down = ShardedLinear(self.inter, cfg.hidden_size, bias=cfg.mlp_bias, tp=tp, reduce_results=True,
                                  reduce_key=reduce_key, dtype=dtype, device=device)

    def use_fused_kernels(self) -> None:
        self.fused_act = self.hidden_act == "silu"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of ``x``, plus ``residual`` if given (added by the down projection)."""
        if self.fused_act:
            from engine.kernels import silu_mul

            return self.down(silu_mul(self.gate_up(x)), residual)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up, residual)

    def load(self, reader: WeightReader, prefix: str) -> None:
        rows = (self.start, self.start + self.inter)
        for param, kind in ((self.gate_up.weight, "weight"), (self.gate_up.bias, "bias")):
            if param is None:
                continue
            parts = [read_rows(reader, f"{prefix}.gate_proj.{kind}", *rows, param),
                     read_rows(reader, f"{prefix}.up_proj.{kind}", *rows, param)]
            load_into(param, torch.cat(parts), f"{prefix} gate_up {kind}")
        load_into(self.down.weight, read_cols(reader, f"{prefix}.down_proj.weight", *rows, self.down.weight),
                  f"{prefix}.down_proj.weight")
        if self.down.bias is not None:
            load_into(self.down.bias, read_full(reader, f"{prefix}.down_proj.bias", self.down.bias),
                      f"{prefix}.down_proj.bias")


def load_vocab_table(table: nn.Module, reader: WeightReader, name: str) -> None:
    """Load a vocabulary-parallel table's rows; rows past the real vocabulary stay zero (padding)."""
    start, stop = table.shard_rows()
    if stop > start:
        rows = read_rows(reader, name, start, stop, table.weight)
        load_into(table.weight[: stop - start], rows, name)


def load_lm_head(head: ParallelLMHead, reader: WeightReader, *, embed_name: str, tied: bool) -> None:
    """Load an LM head that does not share the embedding's table in this stage: from ``lm_head.weight``,
    or from the embedding table when the weights are tied (or the checkpoint has no separate head)."""
    if head.shared:
        return
    name = embed_name if tied or "lm_head.weight" not in reader else "lm_head.weight"
    load_vocab_table(head.table, reader, name)
