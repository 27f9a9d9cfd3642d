"""The layer-range model: one pipeline stage holds layers [start, end) of a model.

The first stage also holds the embedding, the last the final norm and LM head. A stage loads only the
tensors of its range (and, under tensor parallelism, only its rank's shard of each), so its memory grows
with its layers, not with the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.attention import StepMeta
from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.kv_cache import KVCache, KVCacheSpec
from engine.model_source import load_hf_config
from engine.models import FAMILY_CLASSES
from engine.models.common import GatedMLP, RMSNorm
from engine.parallel import ParallelLMHead, ShardedLinear, TPGroup, kv_head_range, onednn_pays
from engine.weights import WeightReader

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ConfigError(f"unsupported dtype {name} (supported: float32, bfloat16, float16)")
        return name
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


class StageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, *, start: int, end: int, tp: TPGroup | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if not 0 <= start < end <= cfg.num_layers:
            raise ConfigError(f"layer range [{start}, {end}) is not within the model's {cfg.num_layers} layers")
        tp = tp or TPGroup.single()
        self.cfg, self.start, self.end, self.tp = cfg, start, end, tp
        self.dtype, self.device = dtype, torch.device(device)
        self.is_first, self.is_last = start == 0, end == cfg.num_layers
        self.fused_kernels = False  # set by optimize_kernels
        family = FAMILY_CLASSES[cfg.family]
        self.family = family(cfg, device=device)
        kw = {"dtype": dtype, "device": device}
        self.embedding = family.embedding(cfg, tp, **kw) if self.is_first else None
        self.layers = nn.ModuleList(family.layer(cfg, tp, index=i, local=i - start, **kw) for i in range(start, end))
        self.head = family.head(cfg, tp, self.embedding, **kw) if self.is_last else None
        lo, hi = kv_head_range(cfg.total_num_kv_heads, tp)
        self.num_kv_heads = hi - lo
        if self.device.type == "cuda":
            # cuDNN's attention spent 2.1 ms of host time per call on an H200 (74% of a 1B decode step's
            # host time): flash and memory-efficient attention do the same work for a fraction of it.
            torch.backends.cuda.enable_cudnn_sdp(False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, start: int = 0, end: int | None = None,
                        tp: TPGroup | None = None, dtype: torch.dtype | str = torch.float32,
                        device: torch.device | str = "cpu") -> StageModel:
        cfg = ModelConfig.from_hf(load_hf_config(model_dir))
        stage = cls(cfg, start=start, end=cfg.num_layers if end is None else end, tp=tp,
                    dtype=parse_dtype(dtype), device=device)
        stage.load(WeightReader(model_dir))
        return stage

    def load(self, reader: WeightReader, *, progress: bool = False) -> None:
        """Read this stage's tensors (its layer range, this rank's shards) from the checkpoint.

        ``progress`` shows a bar on a terminal, a few log lines elsewhere (engine/progress.py).
        """
        from engine.progress import progress as progress_bar

        parts = [p for p in (self.embedding, *self.layers, self.head) if p is not None]
        desc = f"loading layers {self.start}-{self.end - 1}"
        if self.tp.size > 1:
            desc += f" (tp rank {self.tp.rank})"
        with progress_bar(desc, len(parts), unit="parts", tag="engine", enabled=progress) as bar:
            for part in parts:
                part.load(reader)
                bar.update(1)

    def optimize_kernels(self, *, fused: bool = True) -> None:
        """After ``load``: move weights to the fastest kernel's layout for this device and dtype, and on
        CUDA (with Triton) use the fused decode kernels of engine/kernels.py, unless ``fused`` is False."""
        if onednn_pays(self.device, self.dtype):
            for module in self.modules():
                if isinstance(module, (ShardedLinear, ParallelLMHead)):
                    module.use_onednn()
        from engine import kernels

        self.fused_kernels = fused and kernels.available(self.device)
        if self.fused_kernels:
            self.use_fused_kernels()

    def use_fused_kernels(self) -> None:
        """engine/kernels.py wherever it applies: the static decode step's attention (``fused_kernels``,
        read by engine/graphs.py), SiLU times up, RMSNorm, residual adds inside the matrix products."""
        self.fused_kernels = True
        for module in self.modules():
            if isinstance(module, GatedMLP):
                module.use_fused_kernels()
            elif isinstance(module, RMSNorm):
                module.fused = True
            elif isinstance(module, ShardedLinear):
                module.use_fused_residual()

    def kv_spec(self, *, num_slots: int, max_seq_len: int, dtype: torch.dtype | None = None) -> KVCacheSpec:
        return KVCacheSpec(num_layers=len(self.layers), num_kv_heads=self.num_kv_heads,
                           head_dim=self.cfg.head_dim, max_seq_len=max_seq_len, num_slots=num_slots,
                           dtype=dtype or self.dtype)

    def new_cache(self, *, num_slots: int, max_seq_len: int, spare_slots: int = 0) -> KVCache:
        return KVCache(self.kv_spec(num_slots=num_slots, max_seq_len=max_seq_len), device=self.device,
                       spare_slots=spare_slots)

    def make_meta(self, slots: list[int], starts: list[int], lengths: list[int]) -> StepMeta:
        meta = StepMeta.build(slots, starts, lengths, device=self.device, sliding_window=self.cfg.sliding_window)
        limit = self.cfg.max_position_embeddings
        longest = max(s + n for s, n in zip(starts, lengths, strict=True))
        if longest > limit:
            raise ConfigError(f"sequence length {longest} exceeds the model's max_position_embeddings={limit}")
        return meta

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, meta: StepMeta, cache: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """Run one batch step through this stage (tokens packed, see ``engine.attention``).

        x: token ids [N] on the first stage, hidden states [N, hidden] otherwise. Returns hidden states
        [N, hidden], or on the last stage logits: [B, vocab] for each row's last token, or [N, vocab]
        with ``all_logits``.
        """
        self.family.prepare(meta, self.dtype)
        h = self.embedding(x, meta) if self.embedding is not None else x
        for layer in self.layers:
            h = layer(h, meta, cache)
        if self.head is None:
            return h
        if not all_logits:
            h = h[meta.last_index]  # [B, hidden]
        return self.head(h)
