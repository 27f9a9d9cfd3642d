"""Tensor-parallel building blocks that take their process group explicitly.

No global parallel state: every layer receives a ``TPGroup``. ``TPGroup.single()`` stands in for
tensor-parallel size 1, so each layer is testable alone in one process. A group may carry an
``AllReducer`` (``engine.collectives``) that compresses its all-reduces; each call site passes a
stable key (layer and projection), so strategies with per-site state (PowerSGD's warm start) keep it.

Sharding follows the usual Megatron split: column-parallel linears split output features (no
communication), row-parallel linears split input features and end in one all-reduce; the embedding and
LM head split the vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.collectives import AllReducer


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel group: this process's rank and the group size, plus the collectives.

    ``reducer`` None (the default) all-reduces exactly, in place, with ``dist.all_reduce``.
    """

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    reducer: AllReducer | None = None

    @staticmethod
    def single() -> TPGroup:
        return TPGroup(rank=0, size=1, group=None)

    @staticmethod
    def from_group(group: dist.ProcessGroup | None = None, *, reducer: AllReducer | None = None) -> TPGroup:
        return TPGroup(rank=dist.get_rank(group), size=dist.get_world_size(group), group=group, reducer=reducer)

    def all_reduce(self, x: torch.Tensor, key: Hashable | None = None) -> torch.Tensor:
        """The sum of ``x`` over the group (use the result: ``x`` itself may or may not hold it)."""
        if self.size > 1:
            if self.reducer is not None:
                return self.reducer.all_reduce(x, self.group, key=key)
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def split(self, total: int, what: str) -> int:
        """This rank's share of ``total``; raises if it does not divide."""
        if total % self.size:
            raise ConfigError(f"{what}={total} is not divisible by tp={self.size}")
        return total // self.size


def pad_to_multiple(n: int, k: int) -> int:
    return (n + k - 1) // k * k


class ShardedLinear(nn.Module):
    """A linear layer holding one rank's shard; ``reduce_results`` all-reduces (row-parallel), under
    ``reduce_key`` (a name for the call site, the same on every rank, e.g. ``"layers.3.mlp"``).

    The bias of a row-parallel layer is added once, after the reduction, so ranks don't add it tp times.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TPGroup,
                 reduce_results: bool = False, reduce_key: Hashable | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.tp = tp
        self.reduce_results = reduce_results
        self.reduce_key = reduce_key
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

        self.weight_onednn: torch.Tensor | None = None
        self.fuse_residual = False  # see use_fused_residual

    def use_fused_residual(self) -> None:
        """Add ``forward``'s residual inside the matrix product (``torch.addmm``: one kernel, not two)
        where nothing comes between them: no all-reduce, no bias, no prepacked weight."""
        self.fuse_residual = (self.reduce_results and self.tp.size == 1 and self.bias is None
                              and self.weight_onednn is None)

    def use_onednn(self) -> None:
        """Keep the weight prepacked for oneDNN instead (see ``onednn_pays``); frees the original."""
        self.weight_onednn = onednn_pack(self.weight.detach())
        self.weight = None

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_onednn is None:
            return F.linear(x, self.weight, bias)
        return onednn_linear(x, self.weight_onednn, bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias), all-reduced if row-parallel, plus ``residual`` if given."""
        if residual is not None and self.fuse_residual:
            return torch.addmm(residual, x, self.weight.t())
        if not self.reduce_results:
            y = self._matmul(x, self.bias)
        else:
            y = self.tp.all_reduce(self._matmul(x, None), key=self.reduce_key)
            if self.bias is not None:
                y = y + self.bias
        return y if residual is None else residual + y


# oneDNN picks its blocking for an expected batch; 8 served batches 1 to 64 well in measurements.
ONEDNN_BATCH_HINT = 8


@functools.cache
def onednn_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked linear beats PyTorch's default (MKL) for this device and dtype.

    Measured on a 2-core AMD EPYC (Zen 4), torch 2.13 CPU, SmolLM2-135M shapes, all layers in a chain
    (memory-bound): fp32 takes 23/24/51 ms at batch 1/8/32 instead of 48/59/101, bf16 18/19/33 instead
    of 22/24/39. fp16 needs CPU features this machine lacks (and has a fast gemv of its own at batch 1);
    CUDA never uses it. A quick trial packing guards against builds or CPUs without the kernels.
    """
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = onednn_pack(torch.ones(4, 4, dtype=dtype))
        out = onednn_linear(torch.ones(1, 4, dtype=dtype), w, None)
        return bool(torch.all(out == 4))
    except (RuntimeError, AttributeError):
        return False


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ONEDNN_BATCH_HINT)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T (+ bias) with a weight from ``onednn_pack``; x and the result are ordinary tensors."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across ranks; lookups outside a shard give zeros."""

    REDUCE_KEY = "embed_tokens"  # one embedding per stage, so one key

    def __init__(self, vocab_size: int, dim: int, *, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.padded_vocab = pad_to_multiple(vocab_size, tp.size)
        self.per_rank = self.padded_vocab // tp.size
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def shard_rows(self) -> tuple[int, int]:
        """The [start, stop) rows of the full table this rank holds (stop clipped to the real vocab)."""
        return self.start, min(self.start + self.per_rank, self.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out, key=self.REDUCE_KEY)


class ParallelLMHead(nn.Module):
    """Vocabulary-split output projection; ``gather_output`` returns full-vocabulary logits."""

    def __init__(self, embedding: VocabParallelEmbedding | None, vocab_size: int, dim: int, *, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        # Tied embeddings share the embedding's shard (same rows, same padding).
        self.shared = embedding is not None
        self.table = embedding if embedding is not None else VocabParallelEmbedding(
            vocab_size, dim, tp=tp, dtype=dtype, device=device)

        self.weight_onednn: torch.Tensor | None = None

    def use_onednn(self) -> None:
        """A prepacked copy for the projection; the table itself stays for embedding lookups."""
        self.weight_onednn = onednn_pack(self.table.weight.detach())

    def forward(self, x: torch.Tensor, *, gather_output: bool = True) -> torch.Tensor:
        if self.weight_onednn is not None:
            logits = onednn_linear(x, self.weight_onednn, None)
        else:
            logits = F.linear(x, self.table.weight)  # [..., vocab/tp]
        if gather_output:
            logits = self.tp.all_gather_last(logits)[..., : self.vocab_size]
        return logits


def kv_head_range(total_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """The [start, stop) kv heads this rank holds; kv heads are replicated when tp > total_kv_heads."""
    if total_kv_heads >= tp.size:
        per = tp.split(total_kv_heads, "num_key_value_heads")
        return tp.rank * per, (tp.rank + 1) * per
    if tp.size % total_kv_heads:
        raise ConfigError(f"tp={tp.size} must be a multiple of num_key_value_heads={total_kv_heads} "
                          f"when it exceeds it")
    head = tp.rank * total_kv_heads // tp.size
    return head, head + 1
