"""OPT: learned positions (offset 2), LayerNorm with biases, ReLU MLP, optional embedding projection,
pre- or post-norm layers. A second family so that the model layer is really pluggable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import StepMeta
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.models.common import (
    ACTIVATIONS,
    Attention,
    LayerNorm,
    load_into,
    load_lm_head,
    load_vocab_table,
    read_cols,
    read_full,
    read_rows,
)
from engine.parallel import ParallelLMHead, ShardedLinear, TPGroup, VocabParallelEmbedding
from engine.weights import WeightReader

PREFIX = "model.decoder"


def _projection(cfg: ModelConfig, out_dim: int, in_dim: int, *, dtype: torch.dtype,
                device: torch.device | str) -> nn.Parameter | None:
    if cfg.word_embed_proj_dim is None:
        return None
    return nn.Parameter(torch.empty(out_dim, in_dim, dtype=dtype, device=device), requires_grad=False)


class OPTEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.offset = cfg.position_offset
        self.tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.embed_dim, tp=tp, dtype=dtype, device=device)
        self.positions = nn.Parameter(torch.empty(cfg.max_position_embeddings + self.offset, cfg.hidden_size,
                                                  dtype=dtype, device=device), requires_grad=False)
        self.project_in = _projection(cfg, cfg.hidden_size, cfg.embed_dim, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        h = self.tokens(ids)
        if self.project_in is not None:
            h = F.linear(h, self.project_in)
        return h + F.embedding(meta.positions + self.offset, self.positions)

    def load(self, reader: WeightReader) -> None:
        load_vocab_table(self.tokens, reader, f"{PREFIX}.embed_tokens.weight")
        name = f"{PREFIX}.embed_positions.weight"
        load_into(self.positions, read_full(reader, name, self.positions), name)
        if self.project_in is not None:
            name = f"{PREFIX}.project_in.weight"
            load_into(self.project_in, read_full(reader, name, self.project_in), name)


class OPTLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, *, index: int, local: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.index = index
        self.pre_norm = cfg.do_layer_norm_before
        self.attn_norm = LayerNorm(cfg.hidden_size, dtype=dtype, device=device)
        self.attn = Attention(cfg, tp, layer=local, rotary=False, dtype=dtype, device=device,
                              names=("q_proj", "k_proj", "v_proj", "out_proj"),
                              reduce_key=f"layers.{index}.attn")
        self.mlp_norm = LayerNorm(cfg.hidden_size, dtype=dtype, device=device)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.ffn = tp.split(cfg.intermediate_size, "ffn_dim")
        self.start = tp.rank * self.ffn
        self.fc1 = ShardedLinear(cfg.hidden_size, self.ffn, bias=True, tp=tp, dtype=dtype, device=device)
        self.fc2 = ShardedLinear(self.ffn, cfg.hidden_size, bias=True, tp=tp, reduce_results=True,
                                 reduce_key=f"layers.{index}.fc2", dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, meta: StepMeta, cache: KVCache) -> torch.Tensor:
        if self.pre_norm:
            h = x + self.attn(self.attn_norm(x), meta, cache)
            return h + self.fc2(self.act(self.fc1(self.mlp_norm(h))))
        h = self.attn_norm(x + self.attn(x, meta, cache))
        return self.mlp_norm(h + self.fc2(self.act(self.fc1(h))))

    def load(self, reader: WeightReader) -> None:
        prefix = f"{PREFIX}.layers.{self.index}"
        self.attn_norm.load(reader, f"{prefix}.self_attn_layer_norm")
        self.attn.load(reader, f"{prefix}.self_attn")
        self.mlp_norm.load(reader, f"{prefix}.final_layer_norm")
        rows = (self.start, self.start + self.ffn)
        load_into(self.fc1.weight, read_rows(reader, f"{prefix}.fc1.weight", *rows, self.fc1.weight), "fc1")
        load_into(self.fc1.bias, read_rows(reader, f"{prefix}.fc1.bias", *rows, self.fc1.bias), "fc1.bias")
        load_into(self.fc2.weight, read_cols(reader, f"{prefix}.fc2.weight", *rows, self.fc2.weight), "fc2")
        load_into(self.fc2.bias, read_full(reader, f"{prefix}.fc2.bias", self.fc2.bias), "fc2.bias")


class OPTHead(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, embedding: OPTEmbedding | None, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.hidden_size, dtype=dtype, device=device) if cfg.do_layer_norm_before else None
        self.project_out = _projection(cfg, cfg.embed_dim, cfg.hidden_size, dtype=dtype, device=device)
        shared = embedding.tokens if (embedding is not None and cfg.tie_word_embeddings) else None
        self.tied = cfg.tie_word_embeddings
        self.lm_head = ParallelLMHead(shared, cfg.vocab_size, cfg.embed_dim, tp=tp, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor, *, gather_output: bool = True) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        if self.project_out is not None:
            h = F.linear(h, self.project_out)
        return self.lm_head(h, gather_output=gather_output)

    def load(self, reader: WeightReader) -> None:
        if self.norm is not None:
            self.norm.load(reader, f"{PREFIX}.final_layer_norm")
        if self.project_out is not None:
            name = f"{PREFIX}.project_out.weight"
            load_into(self.project_out, read_full(reader, name, self.project_out), name)
        load_lm_head(self.lm_head, reader, embed_name=f"{PREFIX}.embed_tokens.weight", tied=self.tied)


class OPTFamily:
    embedding = OPTEmbedding
    layer = OPTLayer
    head = OPTHead

    def __init__(self, cfg: ModelConfig, *, device: torch.device | str) -> None:
        pass

    def prepare(self, meta: StepMeta, dtype: torch.dtype) -> None:
        """OPT's positions are learned and added at the embedding: nothing to precompute per step."""
