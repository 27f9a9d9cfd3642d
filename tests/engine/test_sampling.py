"""Unit tests for the last stage's sampler: validation, greedy, determinism for replay, distributions."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import ConfigError
from engine.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_stop,
    finish_reason_for_length,
    resolve_seed,
    sample,
    uniform_for,
)

MASK64 = (1 << 64) - 1


def _draw(logits_row: torch.Tensor, p: SamplingParams, seed: int, positions: range) -> list[int]:
    """Sample the same row at many positions in one batch (one row per position)."""
    n = len(positions)
    batch = logits_row.unsqueeze(0).expand(n, -1)
    return sample(batch, [p] * n, [seed] * n, list(positions)).tolist()


# --- SamplingParams validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_k", -3),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("min_p", 1.0),
        ("min_p", -0.25),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.5),
        ("max_tokens", 0),
        ("seed", -7),
        ("seed", 2**63),
    ],
)
def test_invalid_params_raise_config_error_naming_value(field: str, value: float) -> None:
    with pytest.raises(ConfigError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value)
    assert repr(value) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_invalid_stop_entries() -> None:
    with pytest.raises(ConfigError, match="-4"):
        SamplingParams(stop_token_ids=(1, -4))
    with pytest.raises(ConfigError, match="stop"):
        SamplingParams(stop=("",))


def test_params_defaults_and_coercion() -> None:
    p = SamplingParams()
    assert p.greedy and p.max_tokens == 16 and p.seed is None
    assert not SamplingParams(temperature=0.7).greedy
    q = SamplingParams(stop_token_ids=[3, 5], stop=["\n\n"], seed=2**63 - 1)  # type: ignore[arg-type]
    assert q.stop_token_ids == (3, 5) and q.stop == ("\n\n",)
    hash(q)  # frozen and hashable even when built from lists
    with pytest.raises(TypeError):
        SamplingParams(0.5)  # type: ignore[misc]  # keyword-only


# --- uniform_for and seeds ---------------------------------------------------------------------


def _splitmix64_stream(seed: int, n: int) -> list[int]:
    """The textbook splitmix64 generator, written independently, seeded with mix64(seed)."""

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    state, out = mix(seed), []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        out.append(mix(state))
    return out


def test_uniform_for_is_the_splitmix64_stream() -> None:
    # Pinning the algorithm: changing it would break replay of requests already in flight.
    for seed in (0, 1, 42, 2**63 - 1):
        expected = [(z >> 11) / 2**53 for z in _splitmix64_stream(seed, 10)]
        assert [uniform_for(seed, pos) for pos in range(10)] == expected


def test_uniform_for_range_and_uniformity() -> None:
    values = [uniform_for(seed, pos) for seed in (3, 99) for pos in range(10_000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.01
    bins = Counter(int(v * 20) for v in values)
    expected = len(values) / 20
    chi2 = sum((bins[b] - expected) ** 2 / expected for b in range(20))
    assert chi2 < 60  # df=19: p < 1e-5 beyond ~50; values are deterministic so this cannot flake
    assert uniform_for(7, 0) == uniform_for(7, 0)
    assert uniform_for(7, 0) != uniform_for(8, 0)


def test_uniform_for_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="-1"):
        uniform_for(1, -1)
    with pytest.raises(ValueError, match=str(2**63)):
        uniform_for(2**63, 0)


def test_resolve_seed() -> None:
    assert resolve_seed(SamplingParams(seed=123)) == 123
    assert resolve_seed(SamplingParams(seed=0), random.Random(5)) == 0
    a = resolve_seed(SamplingParams(), random.Random(5))
    assert a == resolve_seed(SamplingParams(), random.Random(5))
    assert 0 <= a < 2**63
    fresh = {resolve_seed(SamplingParams()) for _ in range(8)}
    assert len(fresh) == 8 and all(0 <= s < 2**63 for s in fresh)


# --- greedy ------------------------------------------------------------------------------------


def test_greedy_is_argmax_fast_and_mixed_paths() -> None:
    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams()
    fast = sample(logits, [greedy] * 6, [1] * 6, [0] * 6)
    assert fast.dtype == torch.int64 and fast.shape == (6,)
    assert torch.equal(fast, torch.argmax(logits, dim=-1))
    # A sampling row in the batch takes the per-row path; greedy rows must not change.
    mixed = [greedy] * 5 + [SamplingParams(temperature=1.0)]
    out = sample(logits, mixed, [1] * 6, [0] * 6)
    assert torch.equal(out[:5], torch.argmax(logits[:5], dim=-1))


def test_greedy_ties_pick_lowest_index() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0]])
    assert sample(logits, [SamplingParams()], [0], [0]).item() == 1
    with_penalty = SamplingParams(repetition_penalty=1.0001)
    assert sample(logits, [with_penalty], [0], [0], history=[[]]).item() == 1


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=gen)
    want = torch.argmax(logits, dim=-1)
    for p in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        for pos in range(50):
            got = sample(logits, [p] * 4, [11, 12, 13, 14], [pos] * 4)
            assert torch.equal(got, want), (p, pos)


# --- determinism for replay --------------------------------------------------------------------


def _mixed_batch(n: int) -> tuple[torch.Tensor, list[SamplingParams], list[int], list[int], list[list[int]]]:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(n, 64, generator=gen) * 2
    kinds = [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.2, top_k=10),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=1.3),
        SamplingParams(),
        SamplingParams(repetition_penalty=1.5),
    ]
    params = [kinds[i % len(kinds)] for i in range(n)]
    seeds = [1000 + 7 * i for i in range(n)]
    positions = [3 * i + 5 for i in range(n)]
    history = [[(i * 5 + j) % 64 for j in range(i % 4 + 1)] for i in range(n)]
    return logits, params, seeds, positions, history


def test_same_token_regardless_of_batch_order_and_composition() -> None:
    n = 12
    logits, params, seeds, positions, history = _mixed_batch(n)
    base = sample(logits, params, seeds, positions, history)
    perm = list(range(n))
    random.Random(3).shuffle(perm)
    shuffled = sample(
        logits[perm], [params[i] for i in perm], [seeds[i] for i in perm],
        [positions[i] for i in perm], [history[i] for i in perm],
    )
    assert torch.equal(shuffled, base[perm])
    for i in range(n):  # each row alone, as if the other requests had finished
        alone = sample(logits[i : i + 1], [params[i]], [seeds[i]], [positions[i]], [history[i]])
        assert alone.item() == base[i].item()
    # Other requests joining, and sampling that happened before in this process, change nothing.
    extra = torch.randn(3, 64)
    bigger = sample(
        torch.cat([extra, logits]), [SamplingParams(temperature=2.0)] * 3 + params,
        [5, 6, 7] + seeds, [0, 1, 2] + positions, [[], [], []] + history,
    )
    assert torch.equal(bigger[3:], base)


def test_different_seeds_give_different_samples() -> None:
    logits = torch.zeros(20)  # uniform over 20 tokens: two seeds agree at a position with p = 1/20
    p = SamplingParams(temperature=1.0)
    runs = {seed: _draw(logits, p, seed, range(200)) for seed in (1, 2, 3, 12345)}
    seeds = list(runs)
    for a in range(len(seeds)):
        for b in range(a + 1, len(seeds)):
            same = sum(x == y for x, y in zip(runs[seeds[a]], runs[seeds[b]], strict=True))
            assert same < 40, (seeds[a], seeds[b], same)  # expectation is 10
    assert runs[1] == _draw(logits, p, 1, range(200))  # and the same seed replays exactly


# --- distributions and filters -----------------------------------------------------------------


def test_frequencies_match_softmax() -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    temperature = 0.8
    probs = torch.softmax(logits / temperature, dim=-1).tolist()
    n = 12_000
    counts = Counter(_draw(logits, SamplingParams(temperature=temperature), 777, range(n)))
    chi2 = sum((counts[t] - n * q) ** 2 / (n * q) for t, q in enumerate(probs))
    assert set(counts) <= set(range(5))
    assert chi2 < 25, (chi2, counts, probs)  # df=4: p ~ 5e-5 at 25; deterministic seeds, no flakes


def test_top_k_restricts_support() -> None:
    logits = torch.randn(40, generator=torch.Generator().manual_seed(4))
    top5 = set(torch.topk(logits, 5).indices.tolist())
    drawn = set(_draw(logits, SamplingParams(temperature=5.0, top_k=5), 9, range(2000)))
    assert drawn == top5  # never outside, and at a high temperature every one of them shows up


@pytest.mark.parametrize(
    ("top_p", "min_p", "support"),
    [(0.75, 0.0, {0, 1}), (0.85, 0.0, {0, 1, 2}), (1.0, 0.2, {0, 1, 2}), (1.0, 0.7, {0})],
)
def test_top_p_and_min_p_support(top_p: float, min_p: float, support: set[int]) -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p keeps the smallest prefix reaching it,
    # min_p keeps tokens with p >= min_p * 0.5
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    p = SamplingParams(temperature=1.0, top_p=top_p, min_p=min_p)
    assert set(_draw(logits, p, 21, range(1500))) == support


def test_tied_logits_sample_ties_by_token_id() -> None:
    logits = torch.tensor([1.0, 5.0, 5.0, 5.0])
    p = SamplingParams(temperature=1.0, top_k=2)  # keeps the two lowest ids among the tie
    assert set(_draw(logits, p, 8, range(500))) == {1, 2}


def test_repetition_penalty_changes_argmax() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5], [-0.5, -0.6, -3.0, -2.0]])
    p = SamplingParams(repetition_penalty=1.2)
    assert sample(logits, [SamplingParams()] * 2, [0, 0], [0, 0]).tolist() == [0, 0]
    # A positive seen logit is divided: 2.0 / 1.2 = 1.67 < 1.9.
    # A negative one is multiplied: -0.5 * 1.5 = -0.75 < -0.6.
    out = sample(logits, [p, SamplingParams(repetition_penalty=1.5)], [0, 0], [0, 0], [[0, 0, 3], [0]])
    assert out.tolist() == [1, 1]
    assert sample(logits, [p, p], [0, 0], [0, 0], [[], []]).tolist() == [0, 0]


def test_repetition_penalty_matches_hugging_face() -> None:
    processor = pytest.importorskip("transformers").RepetitionPenaltyLogitsProcessor(penalty=1.3)
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(1, 30, generator=gen)
    seen = [3, 7, 7, 0, 29, 12]
    want = processor(torch.tensor([seen]), scores.clone())
    got = apply_repetition_penalty(scores[0], seen, 1.3)
    assert torch.equal(got, want[0])
    with pytest.raises(ValueError, match="30"):
        apply_repetition_penalty(scores[0], [30], 1.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype: torch.dtype) -> None:
    logits, params, seeds, positions, history = _mixed_batch(8)
    low = logits.to(dtype)
    out = sample(low, params, seeds, positions, history)
    assert out.dtype == torch.int64
    assert torch.equal(out, sample(low.float(), params, seeds, positions, history))
    fast = sample(low, [SamplingParams()] * 8, seeds, positions)
    assert torch.equal(fast, torch.argmax(low.float(), dim=-1))


def test_tiny_temperature_is_finite_and_greedy() -> None:
    logits = torch.tensor([[100.0, 99.0, -50.0]])
    p = SamplingParams(temperature=1e-6)
    assert _draw(logits[0], p, 1, range(20)) == [0] * 20


def test_batch_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="len\\(seeds\\)=1"):
        sample(torch.zeros(2, 4), [SamplingParams()] * 2, [0], [0, 0])
    with pytest.raises(ValueError, match="batch"):
        sample(torch.zeros(4), [SamplingParams()], [0], [0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    logits, params, seeds, positions, history = _mixed_batch(8)
    out = sample(logits.cuda(), params, seeds, positions, history)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), sample(logits, params, seeds, positions, history))


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    vocab=st.integers(2, 40),
    temperature=st.floats(0.0, 3.0),
    top_k=st.integers(0, 10),
    top_p=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**63 - 1),
    position=st.integers(0, 10_000),
)
def test_property_row_alone_equals_row_in_batch(
    data: st.DataObject, vocab: int, temperature: float, top_k: int, top_p: float, seed: int, position: int
) -> None:
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(position))
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    row = data.draw(st.integers(0, 2))
    others = SamplingParams(temperature=1.0)
    params, seeds, positions = [others] * 3, [1, 2, 3], [0, 1, 2]
    params[row], seeds[row], positions[row] = p, seed, position
    batch = sample(logits, params, seeds, positions)
    alone = sample(logits[row : row + 1], [p], [seed], [position])
    assert batch[row].item() == alone.item()
    if top_k > 0:
        assert alone.item() in torch.topk(logits[row], min(top_k, vocab)).indices.tolist()


def test_apply_stop_and_length() -> None:
    p = SamplingParams(stop_token_ids=(5,), max_tokens=3)
    assert apply_stop(5, p, eos_token_ids=[2]) == "stop"
    assert apply_stop(2, p, eos_token_ids=[2]) == "stop"
    assert apply_stop(7, p, eos_token_ids=[2]) is None
    ignoring = SamplingParams(stop_token_ids=(5,), ignore_eos=True)
    assert apply_stop(2, ignoring, eos_token_ids=[2]) is None
    assert apply_stop(5, ignoring, eos_token_ids=[2]) == "stop"
    assert finish_reason_for_length(2, p) is None
    assert finish_reason_for_length(3, p) == "length"
