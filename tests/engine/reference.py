"""Reference models for fidelity tests: small random-init Hugging Face checkpoints of each supported
family, and a plain greedy loop over the Hugging Face model (no generate() heuristics such as EOS
suppression), so that the engine is compared with the reference math and nothing else.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

# A larger init than the default 0.02 spreads the logits, so greedy ties (which fp32 rounding could
# break either way) are practically impossible over 48 tokens.
INIT = 0.15

CONFIGS = {
    "llama-gqa-tied": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                     tie_word_embeddings=True, max_position_embeddings=512)),
    "llama3-rope": ("llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=8, num_key_value_heads=2, vocab_size=300,
                                  tie_word_embeddings=False, max_position_embeddings=512,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64},
                                  rope_theta=500000.0)),
    "mistral-window": ("mistral", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                       sliding_window=16, max_position_embeddings=512)),
    "qwen2-bias": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                 max_position_embeddings=512, tie_word_embeddings=False)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                        vocab_size=256, max_position_embeddings=512, word_embed_proj_dim=64)),
    "opt-postnorm-proj": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                      vocab_size=256, max_position_embeddings=512, word_embed_proj_dim=32,
                                      do_layer_norm_before=False)),
}


def _config(family: str, kwargs: dict):  # noqa: ANN202 - a transformers config
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "opt": OPTConfig}[family]
    extra = {"initializer_range": INIT} if family != "opt" else {"init_std": INIT}
    return cls(**kwargs, **extra)


def make_random_model(name: str, directory: Path, *, seed: int = 0) -> Path:
    """Save a random-init model of config ``name`` to ``directory`` (safetensors) and return it."""
    from transformers import AutoModelForCausalLM

    family, kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, kwargs), dtype=torch.float32)
    if family == "qwen2":
        # Random init leaves biases at zero; give q/k/v biases values so the test can see them.
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=INIT)
    if family == "opt":
        for p in model.parameters():
            if p.dim() == 1 and p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=INIT)  # biases and norm offsets matter in OPT: make them nonzero
    model.save_pretrained(directory)
    return directory


# The reference is a pure function of the weights and the prompt, and the embedded model's is slow (a
# greedy run of 48 tokens takes seconds): the models load_reference gives are kept for the session (one
# per directory whose weights are unchanged), and their results are remembered, so that the tests that
# compare the engine, its stages and its tensor-parallel ranks with the same prompt compute it once.
_MODELS: dict[tuple, object] = {}
_RESULTS: dict[tuple, object] = {}


def _weights_key(model_dir: Path) -> tuple:
    """The directory and what its weight files are now (a rewritten file is another model)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("*.bin"))
    return (str(Path(model_dir).resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def load_reference(model_dir: Path):  # noqa: ANN201 - a transformers model
    from transformers import AutoModelForCausalLM

    key = _weights_key(model_dir)
    if key not in _MODELS:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
        model.tensorfleet_reference_key = key  # what reference_logits and reference_greedy remember it by
        _MODELS[key] = model
    return _MODELS[key]


def _remembered(kind: str, model, ids: list[int], n: int, compute):  # noqa: ANN001, ANN202
    key = getattr(model, "tensorfleet_reference_key", None)
    if key is None:  # not a model of load_reference (e.g. one moved to a GPU): computed each time
        return compute()
    what = (kind, key, tuple(ids), n)
    if what not in _RESULTS:
        _RESULTS[what] = compute()
    result = _RESULTS[what]
    return result.clone() if isinstance(result, torch.Tensor) else list(result)


def reference_logits(model, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    """Logits for every position of one unpadded prompt: [T, vocab]."""
    return _remembered("logits", model, ids, 0, lambda: _logits(model, ids))


def reference_greedy(model, ids: list[int], n: int) -> list[int]:  # noqa: ANN001
    """n greedy tokens from the Hugging Face model, using its own KV cache."""
    return _remembered("greedy", model, ids, n, lambda: _greedy(model, ids, n))


@torch.no_grad()
def _logits(model, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> list[int]:  # noqa: ANN001
    # transformers renamed past_key_values to cache in 5.2x; the GPU image has an older 5.x.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(torch.tensor([ids]), use_cache=True)
    tokens, nxt = [], int(out.logits[0, -1].argmax())
    for _ in range(n):
        tokens.append(nxt)
        if len(tokens) == n:
            break
        past = getattr(out, "cache", None) or out.past_key_values
        out = model(torch.tensor([[nxt]]), use_cache=True, **{cache_kw: past})
        nxt = int(out.logits[0, -1].argmax())
    return tokens


# Published shapes, random-init, for speed benchmarks (scripts/bench_links.py, GPU benchmarks).
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, rms_norm_eps=1e-5),
    # Not published: lets the benchmark scripts that take a shape run end to end on CPU in their tests.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                 max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5),
}


def make_shaped_model(shape: str, directory: Path, *, dtype: torch.dtype = torch.bfloat16,
                      device: str = "cpu", seed: int = 0) -> Path:
    """Save a random-init Llama of a published ``shape`` (SHAPES) in ``dtype`` to ``directory``; the
    weights are drawn on ``device`` (a GPU makes an 8B shape in seconds). Reuses a complete directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        return directory
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape], initializer_range=0.02), dtype=dtype)
    model.save_pretrained(directory)
    return directory
