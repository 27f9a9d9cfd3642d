"""CUDA graphs for a stage's decode steps.

A decode step of a small model is bound by the host, not the GPU: each layer launches a dozen kernels,
and Python spends longer issuing them than the GPU spends running them (a Llama-3.2-1B step took 8 ms
against a 0.8 ms memory roofline on an H100). A CUDA graph records a step's kernels once and replays
them with one launch.

A graph has fixed shapes, so steps are padded: the batch up to a bucket (1, 2, 4, 8, 16, 24, 32, ...),
the keys each row reads up to a context bucket (powers of two from 64, and the cache's length). Padding
rows use the cache's spare slot, so they never touch a sequence's keys. One graph per (batch, context)
bucket, captured when first needed; all share one memory pool. Inputs go into static buffers before each
replay, and the output is copied out (the next replay overwrites it).

In a tensor-parallel group over NCCL each rank captures and replays its own graphs, with the group's
all-reduces recorded in them (graphs_pay).

Steps with prompt tokens, and every step off CUDA, run eagerly. ``DecodeGraphs(capture=False)`` runs the
same padded, static-shaped step eagerly: how the CPU tests check the graph path's arithmetic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine import kernels
from engine.attention import StepMeta
from engine.kv_cache import KVCache

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_CONTEXT = 64


def graphs_pay(stage) -> bool:  # noqa: ANN001 - StageModel
    """Whether ``stage``'s decode steps should run as CUDA graphs: on CUDA, alone or in a tensor-parallel
    group over NCCL with exact all-reduces (NCCL collectives are recorded in the graph; every rank sees the
    same steps, so all replay the same bucket's graph in lockstep). Compressed all-reduces stay eager.
    ``TENSORFLEET_TP_GRAPHS=0`` keeps tensor-parallel groups eager."""
    if stage.device.type != "cuda":
        return False
    if stage.tp.size == 1:
        return True
    import torch.distributed as dist

    return (os.environ.get("TENSORFLEET_TP_GRAPHS", "1") != "0" and stage.tp.reducer is None
            and dist.get_backend(stage.tp.group) == "nccl")


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def context_buckets(max_seq_len: int) -> tuple[int, ...]:
    out, c = [], MIN_CONTEXT
    while c < max_seq_len:
        out.append(c)
        c *= 2
    return (*out, max_seq_len)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    x: torch.Tensor  # [B] token ids (first stage) or [B, hidden]
    slots: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    out: torch.Tensor | None = None
    meta: StepMeta | None = None


class DecodeGraphs:
    """Decode steps of ``stage`` over ``cache`` (which needs a spare slot) through CUDA graphs."""

    def __init__(self, stage, cache: KVCache, *, capture: bool | None = None) -> None:  # noqa: ANN001 - StageModel
        if cache.spare_slot is None:
            raise ValueError("CUDA-graph decode needs a KV cache with a spare slot (new_cache(spare_slots=1))")
        self.stage, self.cache = stage, cache
        self.capture = stage.device.type == "cuda" if capture is None else capture
        self.max_batch = cache.spec.num_slots
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < self.max_batch) + (self.max_batch,)
        self.context_buckets = context_buckets(cache.spec.max_seq_len)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.replays = 0

    def handles(self, lengths: list[int]) -> bool:
        return 0 < len(lengths) <= self.max_batch and all(n == 1 for n in lengths)

    @torch.inference_mode()
    def run(self, slots: list[int], starts: list[int], x: torch.Tensor) -> torch.Tensor:
        """One decode step: row b's token (or hidden state) ``x[b]`` at position ``starts[b]`` of slot
        ``slots[b]``. Returns what ``stage.forward`` returns for these rows."""
        rows = len(slots)
        longest = max(starts) + 1
        if longest > self.cache.spec.max_seq_len:
            raise ValueError(f"position {longest - 1} is past the KV cache's {self.cache.spec.max_seq_len} tokens")
        key = (bucket(rows, self.batch_buckets), bucket(longest, self.context_buckets))
        g = self.graphs.get(key) or self._make(*key)
        spare = self.cache.spare_slot
        g.slots.copy_(torch.tensor(slots + [spare] * (key[0] - rows)), non_blocking=True)
        g.positions.copy_(torch.tensor(starts + [0] * (key[0] - rows)), non_blocking=True)
        g.x[:rows].copy_(x, non_blocking=True)
        if g.graph is not None:
            g.graph.replay()
            self.replays += 1
            return g.out[:rows].clone()
        return self._forward(g)[:rows]

    def _forward(self, g: _Graph) -> torch.Tensor:
        g.meta.extras.clear()  # the mask and RoPE tables are rebuilt from this step's positions
        return self.stage(g.x, g.meta, self.cache)

    def _make(self, batch: int, context: int) -> _Graph:
        device = self.stage.device
        if self.stage.is_first:
            x = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            x = torch.zeros(batch, self.stage.cfg.hidden_size, dtype=self.stage.dtype, device=device)
        spare = torch.full((batch,), self.cache.spare_slot, dtype=torch.long, device=device)
        g = _Graph(graph=None, x=x, slots=spare, positions=torch.zeros(batch, dtype=torch.long, device=device))
        fused = self.stage.fused_kernels
        splits = kernels.num_splits(batch, self.stage.num_kv_heads, context) if fused else 1
        g.meta = StepMeta.static_decode(g.slots, g.positions, context, sliding_window=self.stage.cfg.sliding_window,
                                        fused=fused, attn_splits=splits)
        if self.capture:
            self._capture(g)
        self.graphs[(batch, context)] = g
        return g

    def _capture(self, g: _Graph) -> None:
        """Warm up on a side stream (cuBLAS and the allocator settle), then record; every row writes the
        spare slot meanwhile."""
        stream = torch.cuda.Stream(device=self.stage.device)
        stream.wait_stream(torch.cuda.current_stream(self.stage.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(g)
        torch.cuda.current_stream(self.stage.device).wait_stream(stream)
        g.graph = torch.cuda.CUDAGraph()
        g.meta.extras.clear()
        # Thread-local capture: ProcessGroupNCCL's watchdog thread queries CUDA events meanwhile, which a
        # global capture would refuse.
        with torch.cuda.graph(g.graph, pool=self.pool, stream=stream,
                              capture_error_mode="thread_local" if self.stage.tp.size > 1 else "global"):
            g.out = self.stage(g.x, g.meta, self.cache)
