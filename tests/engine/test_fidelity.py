"""Tier 2: the engine against Hugging Face transformers in fp32 on CPU, on the same weights.

For every supported family (random-init configs) and the embedded SmolLM2 model: logits of whole prompts
within a tight tolerance and 48 greedy tokens identical, run (a) as one stage, (b) split into 3 stages
chained in one process, and (d) as one batch of prompts of different lengths. Tensor parallelism over
gloo processes (c) is in test_tensor_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from engine.llm import LLM, EngineConfig
from engine.sampling import SamplingParams
from tests.engine.reference import (
    CONFIGS,
    load_reference,
    make_random_model,
    reference_greedy,
    reference_logits,
)

# fp32 on both sides; the only differences are summation order in matmuls and attention.
LOGIT_ATOL = 2e-4
NEW_TOKENS = 48
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, float(ref.abs().max()))
    diff = float((ours - ref).abs().max())
    assert diff <= LOGIT_ATOL * scale, f"max |logit diff| {diff:.3g} exceeds {LOGIT_ATOL * scale:.3g}"


def random_prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("models")
    return {name: make_random_model(name, root / name) for name in CONFIGS}


def engine_for(model_dir, *, stages: int = 1, optimize: bool = True) -> LLM:  # noqa: ANN001
    return LLM(EngineConfig(model=str(model_dir), stages=stages, num_slots=6, max_seq_len=160,
                            optimize_kernels=optimize), load_tokenizer=False)


def check_prompt(llm: LLM, ref, ids: list[int]) -> None:  # noqa: ANN001
    logits = llm.forward([0], [0], [ids], all_logits=True)[0]
    assert_logits_close(logits, reference_logits(ref, ids))
    out = llm.generate([ids], GREEDY)[0]
    assert out.token_ids == reference_greedy(ref, ids, NEW_TOKENS)


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_model_matches_transformers(model_dirs: dict, name: str, stages: int) -> None:
    ref = load_reference(model_dirs[name])
    # One stage runs the optimized CPU kernels (oneDNN), three stages the plain torch.nn.functional path.
    llm = engine_for(model_dirs[name], stages=stages, optimize=stages == 1)
    assert len(llm.stages) == stages
    for ids in random_prompts(ref.config.vocab_size, [1, 11, 40]):
        check_prompt(llm, ref, ids)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_of_different_lengths(model_dirs: dict, name: str) -> None:
    ref = load_reference(model_dirs[name])
    llm = engine_for(model_dirs[name], stages=2)
    prompts = random_prompts(ref.config.vocab_size, [7, 30, 1, 19], seed=3)
    # Last-token logits of a padded prefill batch against each prompt alone.
    width = max(map(len, prompts))
    assert width > min(map(len, prompts))
    logits = llm.forward([0, 1, 2, 3], [0] * 4, prompts)
    for row, ids in zip(logits, prompts, strict=True):
        assert_logits_close(row, reference_logits(ref, ids)[-1])
    # Whole generations in one batch (sequences sharing steps at different positions).
    outs = llm.generate(prompts, GREEDY)
    for out, ids in zip(outs, prompts, strict=True):
        assert out.token_ids == reference_greedy(ref, ids, NEW_TOKENS)


def test_sliding_window_is_exercised(model_dirs: dict) -> None:
    """The mistral config's window (16) is shorter than the prompts, so the mask matters."""
    ref = load_reference(model_dirs["mistral-window"])
    assert ref.config.sliding_window == 16
    llm = engine_for(model_dirs["mistral-window"])
    assert llm.model_cfg.sliding_window == 16
    ids = random_prompts(ref.config.vocab_size, [40])[0]
    full = llm.forward([0], [0], [ids], all_logits=True)[0]
    assert_logits_close(full, reference_logits(ref, ids))


EMBEDDED_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


@pytest.fixture(scope="module")
def embedded(embedded_model_dir) -> tuple:  # noqa: ANN001
    return load_reference(embedded_model_dir), embedded_model_dir


@pytest.mark.parametrize("stages", [1, 3])
def test_embedded_model_matches_transformers(embedded: tuple, stages: int) -> None:
    ref, model_dir = embedded
    llm = LLM(EngineConfig(model=str(model_dir), stages=stages, num_slots=4, max_seq_len=160,
                           optimize_kernels=stages == 1))
    for text in EMBEDDED_PROMPTS[: 3 if stages == 1 else 1]:
        check_prompt(llm, ref, llm.encode(text))


def test_embedded_batch_of_different_lengths(embedded: tuple) -> None:
    ref, model_dir = embedded
    llm = LLM(EngineConfig(model=str(model_dir), num_slots=4, max_seq_len=160))
    prompts = [llm.encode(t) for t in EMBEDDED_PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    outs = llm.generate(prompts, GREEDY)
    for out, ids in zip(outs, prompts, strict=True):
        assert out.token_ids == reference_greedy(ref, ids, NEW_TOKENS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_prefill_mixed_with_decode(model_dirs: dict, name: str) -> None:
    """A long prompt prefilled in chunks (each chunk attends to the earlier ones through the cache) in
    the same steps as another sequence's decode tokens: every logit as in one whole forward."""
    ref = load_reference(model_dirs[name])
    llm = engine_for(model_dirs[name], stages=2)
    long, short = random_prompts(ref.config.vocab_size, [40, 11], seed=5)
    short_ref = reference_greedy(ref, short, 3)
    want_long = reference_logits(ref, long)
    want_short = reference_logits(ref, short + short_ref[:2])
    # step 1: the whole short prompt and the long prompt's first chunk (both prefill rows)
    out = llm.forward([4, 1], [0, 0], [short, long[:16]], all_logits=True)
    assert_logits_close(out[0, : len(short)], want_short[: len(short)])
    assert_logits_close(out[1, :16], want_long[:16])
    # steps 2 and 3: one decode row next to the following chunks, which start where the cache ends
    for i, (lo, hi) in enumerate([(16, 32), (32, 40)]):
        pos = len(short) + i
        out = llm.forward([1, 4], [lo, pos], [long[lo:hi], [short_ref[i]]], all_logits=True)
        assert_logits_close(out[0, : hi - lo], want_long[lo:hi])
        assert_logits_close(out[1, 0], want_short[pos])
