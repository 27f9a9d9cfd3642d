"""The Llama family, written once with switches: Llama (incl. Llama 3 RoPE scaling, tied embeddings),
Mistral (sliding window) and Qwen2 (q/k/v biases). Only the checkpoint names and switches differ.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import StepMeta
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.models.common import Attention, GatedMLP, RMSNorm, Rotary, load_lm_head, load_vocab_table
from engine.parallel import ParallelLMHead, TPGroup, VocabParallelEmbedding
from engine.weights import WeightReader


class LlamaEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp=tp, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        return self.tokens(ids)

    def load(self, reader: WeightReader) -> None:
        load_vocab_table(self.tokens, reader, "model.embed_tokens.weight")


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, *, index: int, local: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.index = index
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, device=device)
        self.attn = Attention(cfg, tp, layer=local, rotary=True, dtype=dtype, device=device,
                              names=("q_proj", "k_proj", "v_proj", "o_proj"),
                              reduce_key=f"layers.{index}.attn")
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, device=device)
        self.mlp = GatedMLP(cfg, tp, dtype=dtype, device=device, reduce_key=f"layers.{index}.mlp")

    def forward(self, x: torch.Tensor, meta: StepMeta, cache: KVCache) -> torch.Tensor:
        h = self.attn(self.input_norm(x), meta, cache, residual=x)  # x + attention
        return self.mlp(self.post_norm(h), residual=h)  # h + mlp

    def load(self, reader: WeightReader) -> None:
        prefix = f"model.layers.{self.index}"
        self.input_norm.load(reader, f"{prefix}.input_layernorm")
        self.attn.load(reader, f"{prefix}.self_attn")
        self.post_norm.load(reader, f"{prefix}.post_attention_layernorm")
        self.mlp.load(reader, f"{prefix}.mlp")


class LlamaHead(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, embedding: LlamaEmbedding | None, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.tied = cfg.tie_word_embeddings
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, device=device)
        shared = embedding.tokens if (embedding is not None and self.tied) else None
        self.lm_head = ParallelLMHead(shared, cfg.vocab_size, cfg.hidden_size, tp=tp, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor, *, gather_output: bool = True) -> torch.Tensor:
        return self.lm_head(self.norm(h), gather_output=gather_output)

    def load(self, reader: WeightReader) -> None:
        self.norm.load(reader, "model.norm")
        load_lm_head(self.lm_head, reader, embed_name="model.embed_tokens.weight", tied=self.tied)


class LlamaFamily:
    embedding = LlamaEmbedding
    layer = LlamaLayer
    head = LlamaHead

    def __init__(self, cfg: ModelConfig, *, device: torch.device | str) -> None:
        self.rotary = Rotary(cfg.rope, cfg.head_dim, device=device)

    def prepare(self, meta: StepMeta, dtype: torch.dtype) -> None:
        self.rotary.prepare(meta, dtype)
