"""Model configuration: one typed description of the architectures the engine runs.

A Hugging Face ``config.json`` is translated once, in ``ModelConfig.from_hf``; the model code reads only
this dataclass. Sizes are global (``total_num_heads``); per-rank shares live in the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ConfigError

# model_type -> family. Llama, Mistral and Qwen2 differ only by switches (biases, sliding window, RoPE).
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt"}


@dataclass(frozen=True, kw_only=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default" | "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("default", "llama3", "linear"):
            raise ConfigError(f"unsupported rope scaling type {self.kind!r} (supported: default, llama3, linear)")
        if not (self.theta > 0 and math.isfinite(self.theta)):
            raise ConfigError(f"rope theta={self.theta} must be positive")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    model_type: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    total_num_heads: int
    total_num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    # OPT-only switches.
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    position_offset: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "total_num_heads",
                     "total_num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.total_num_heads % self.total_num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.total_num_heads} is not divisible by "
                              f"num_key_value_heads={self.total_num_kv_heads}")
        if self.hidden_act not in ("silu", "relu", "gelu"):
            raise ConfigError(f"unsupported activation {self.hidden_act!r}")

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise a ConfigError naming both numbers if this model cannot be split tp ways."""
        if tp < 1:
            raise ConfigError(f"tensor-parallel size tp={tp} must be >= 1")
        for name, total in (("num_attention_heads", self.total_num_heads),
                            ("intermediate_size", self.intermediate_size)):
            if total % tp:
                raise ConfigError(f"{name}={total} is not divisible by tp={tp}")
        kv = self.total_num_kv_heads
        if kv % tp and tp % kv:
            raise ConfigError(f"num_key_value_heads={kv} and tp={tp}: one must divide the other")

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT may project it to hidden_size)."""
        return self.word_embed_proj_dim or self.hidden_size

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            arch = ", ".join(hf.get("architectures") or []) or "unknown"
            raise ConfigError(f"unsupported architecture model_type={model_type!r} ({arch}); "
                              f"supported: {', '.join(sorted(FAMILIES))}")
        family = FAMILIES[model_type]
        return _opt_config(hf) if family == "opt" else _llama_config(model_type, hf)


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope_config(hf: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes rope_parameters (theta inside); 4.x writes rope_theta plus rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _llama_config(model_type: str, hf: dict[str, Any]) -> ModelConfig:
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    attention_bias = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    return ModelConfig(
        model_type=model_type,
        family="llama",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        total_num_heads=heads,
        total_num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and no o bias; Llama's attention_bias covers all four.
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=int(window) if window else None,
        rope=_rope_config(hf),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )


def _opt_config(hf: dict[str, Any]) -> ModelConfig:
    hidden = int(hf["hidden_size"])
    act = hf.get("activation_function", "relu")
    if hf.get("_remove_final_layer_norm", False):
        raise ConfigError("OPT checkpoints with _remove_final_layer_norm=True are not supported")
    if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
        raise ConfigError("OPT variants without biases or affine layer norms are not supported")
    proj = int(hf.get("word_embed_proj_dim") or hidden)
    return ModelConfig(
        model_type="opt",
        family="opt",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["ffn_dim"]),
        num_layers=int(hf["num_hidden_layers"]),
        total_num_heads=int(hf["num_attention_heads"]),
        total_num_kv_heads=int(hf["num_attention_heads"]),
        head_dim=hidden // int(hf["num_attention_heads"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        norm_eps=1e-5,
        hidden_act=act,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        word_embed_proj_dim=proj if proj != hidden else None,
        do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
        position_offset=2,  # OPT's learned positions start at index 2 (a fairseq legacy)
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )
