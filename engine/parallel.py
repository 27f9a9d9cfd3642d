"""Tensor-parallel building blocks that take their process group explicitly.

No global parallel state: every layer receives a ``TPGroup``. ``TPGroup.single()`` stands in for
tensor-parallel size 1, so each layer is testable alone in one process.

Sharding follows the usual Megatron split: column-parallel linears split output features (no
communication), row-parallel linears split input features and end in one all-reduce; the embedding and
LM head split the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel group: this process's rank and the group size, plus the collectives."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    @staticmethod
    def single() -> TPGroup:
        return TPGroup(rank=0, size=1, group=None)

    @staticmethod
    def from_group(group: dist.ProcessGroup | None = None) -> TPGroup:
        return TPGroup(rank=dist.get_rank(group), size=dist.get_world_size(group), group=group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
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
    """A linear layer holding one rank's shard; ``reduce_results`` all-reduces (row-parallel).

    The bias of a row-parallel layer is added once, after the reduction, so ranks don't add it tp times.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TPGroup,
                 reduce_results: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.tp = tp
        self.reduce_results = reduce_results
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

        self.weight_onednn: torch.Tensor | None = None

    def use_onednn(self) -> None:
        """Keep the weight in oneDNN's blocked layout instead (see ``onednn_pays``); frees the original."""
        self.weight_onednn = self.weight.detach().contiguous().to_mkldnn()
        self.weight = None

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_onednn is None:
            return F.linear(x, self.weight, bias)
        y = onednn_linear(x, self.weight_onednn)
        return y + bias if bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce_results:
            return self._matmul(x, self.bias)
        y = self.tp.all_reduce(self._matmul(x, None))
        return y + self.bias if self.bias is not None else y


def onednn_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear beats PyTorch's default (MKL) for this device and dtype.

    Measured on a 2-core AMD EPYC (Zen 4), torch 2.13 CPU, SmolLM2-135M shapes, all layers in a chain
    (memory-bound, conversions included): fp32 takes 30/44/75 ms at batch 1/8/32 instead of 48/59/101.
    bf16 is as fast either way; CUDA never uses it.
    """
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with a oneDNN (mkldnn-layout) weight; x and the result are ordinary tensors."""
    return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), weight, None).to_dense()


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across ranks; lookups outside a shard give zeros."""

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
        return self.tp.all_reduce(out)


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
        """A oneDNN copy for the projection; the table itself stays for embedding lookups."""
        self.weight_onednn = self.table.weight.detach().contiguous().to_mkldnn()

    def forward(self, x: torch.Tensor, *, gather_output: bool = True) -> torch.Tensor:
        if self.weight_onednn is not None:
            logits = onednn_linear(x, self.weight_onednn)
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
