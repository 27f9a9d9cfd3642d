"""The sampler of the last pipeline stage.

Replay after a node failure must reproduce the same tokens, so a draw depends only on
(seed, position, logits): the uniform number comes from a counter-based hash of (seed, position)
instead of a stateful generator, and every row is processed on its own, so neither batch
composition, nor other requests, nor how many tokens this process sampled before can change it.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from engine.errors import ConfigError

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 means greedy (top_k/top_p/min_p are ignored)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings: matched later by the detokenizer
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Callers converting protobuf repeated fields or JSON hand us lists; keep the object hashable.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        self._validate_numbers()
        self._validate_stops()

    def _validate_numbers(self) -> None:
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise ConfigError(f"temperature={t!r} must be a finite number >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOKEN_ID:
            raise ConfigError(f"top_k={self.top_k!r} must be an integer in 0..{MAX_TOKEN_ID} (0 turns it off)")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not (isinstance(self.min_p, int | float) and 0 <= self.min_p < 1):
            raise ConfigError(f"min_p={self.min_p!r} must be in [0, 1)")
        rp = self.repetition_penalty
        if not (isinstance(rp, int | float) and math.isfinite(rp) and rp > 0):
            raise ConfigError(f"repetition_penalty={rp!r} must be a finite number > 0 (1 turns it off)")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED):
            raise ConfigError(f"seed={self.seed!r} must be an integer in 0..{_MAX_SEED} or None")

    def _validate_stops(self) -> None:
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or len(self.stop) > MAX_STOPS:
            raise ConfigError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids and {MAX_STOPS} stop strings "
                              f"(got {len(self.stop_token_ids)} and {len(self.stop)})")
        for tid in self.stop_token_ids:
            if not _is_int(tid) or not 0 <= tid <= MAX_TOKEN_ID:
                raise ConfigError(f"stop_token_ids contains {tid!r}; token ids are integers in 0..{MAX_TOKEN_ID}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise ConfigError(f"stop contains {s[:40]!r}...; stop strings must be non-empty str of at most "
                                  f"{MAX_STOP_CHARS} characters" if isinstance(s, str) and s else
                                  f"stop contains {s!r}; stop strings must be non-empty str")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Bounds on what one request may ask for (each stop string is matched against the text after every token).
MAX_STOPS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 16, 256, 64
MAX_TOKEN_ID = 2**31 - 1  # what the wire's int32 token ids hold (a model's own vocabulary is checked too)


def _is_int(x: object) -> bool:
    # bool is an int subclass, but True as a top_k is a caller bug, not a value.
    return isinstance(x, int) and not isinstance(x, bool)


def _mix64(z: int) -> int:
    """The splitmix64 finalizer (Steele, Lea, Flood 2014): a bijection on 64-bit integers."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform_for(seed: int, position: int) -> float:
    """A uniform float in [0, 1) with 53 random bits, a pure function of (seed, position).

    It is element ``position`` of the splitmix64 stream started at state ``mix64(seed)``; mixing
    the seed first keeps nearby seeds (s, s+1) from giving shifted copies of one stream.
    """
    if not _is_int(seed) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed={seed!r} must be an integer in 0..{_MAX_SEED}")
    if not _is_int(position) or position < 0:
        raise ValueError(f"position={position!r} must be an integer >= 0")
    state = (_mix64(seed) + (position + 1) * _GOLDEN_GAMMA) & _MASK64
    return (_mix64(state) >> 11) * (1.0 / (1 << 53))


def resolve_seed(params: SamplingParams, rng: random.Random | None = None) -> int:
    """The request's seed: its own, or a fresh 63-bit one drawn once at admission.

    The caller stores the result with the request so that a replay after failover reuses it.
    """
    if params.seed is not None:
        return params.seed
    return rng.getrandbits(63) if rng is not None else secrets.randbits(63)


def apply_stop(token_id: int, params: SamplingParams, eos_token_ids: Sequence[int]) -> str | None:
    """Return "stop" when ``token_id`` ends the request (a stop token, or EOS unless ignored), else None."""
    if token_id in params.stop_token_ids:
        return "stop"
    if not params.ignore_eos and token_id in eos_token_ids:
        return "stop"
    return None


def finish_reason_for_length(num_generated: int, params: SamplingParams) -> Literal["length"] | None:
    return "length" if num_generated >= params.max_tokens else None


def finish_reason(token_id: int, num_generated: int, params: SamplingParams, eos_token_ids: Sequence[int], *,
                  stop_string_seen: bool = False) -> str | None:
    """Why a request ends after ``token_id`` (its ``num_generated``-th token): "stop", "length" or None."""
    return (apply_stop(token_id, params, eos_token_ids) or ("stop" if stop_string_seen else None)
            or finish_reason_for_length(num_generated, params))


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    positions: Sequence[int],
    history: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [batch, vocab]; int64 ids [batch] on the logits' device.

    Row i uses params[i], seeds[i], positions[i] (the position of the token being sampled) and
    history[i] (prompt + generated ids, for the repetition penalty).
    """
    _check_batch(logits, params, seeds, positions, history)
    needs_history = [p.repetition_penalty != 1.0 for p in params]
    if all(p.greedy for p in params) and not any(needs_history):
        # Fast path for the common greedy decode; torch.argmax breaks ties to the lowest index.
        return torch.argmax(logits, dim=-1).to(torch.int64)
    x = logits.to(torch.float32)  # [batch, vocab]; a copy only when the dtype differs
    out = []
    for i, p in enumerate(params):
        row = x[i]
        if needs_history[i] and history is not None and len(history[i]) > 0:
            row = apply_repetition_penalty(row, history[i], p.repetition_penalty)
        if p.greedy:
            out.append(torch.argmax(row))
        else:
            out.append(_sample_row(row, p, uniform_for(seeds[i], positions[i])))
    return torch.stack(out).to(torch.int64)


def _check_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    positions: Sequence[int],
    history: Sequence[Sequence[int]] | None,
) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape)
        raise ValueError(f"logits must be a float [batch, vocab] tensor, got {logits.dtype} {shape}")
    batch = logits.shape[0]
    lengths = {"params": len(params), "seeds": len(seeds), "positions": len(positions)}
    if history is not None:
        lengths["history"] = len(history)
    for name, n in lengths.items():
        if n != batch:
            raise ValueError(f"len({name})={n} does not match logits batch={batch}")
    if batch == 0:
        raise ValueError("logits has batch=0; there is nothing to sample")


def apply_repetition_penalty(row: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """Hugging Face semantics: each distinct seen token's logit is divided by penalty if > 0, else
    multiplied. Returns a new tensor; ``row`` [vocab] is left unchanged."""
    vocab = row.shape[0]
    ids = sorted(set(history))
    if ids[0] < 0 or ids[-1] >= vocab:
        bad = ids[0] if ids[0] < 0 else ids[-1]
        raise ValueError(f"history holds token id {bad}, outside the vocab 0..{vocab - 1}")
    idx = torch.tensor(ids, dtype=torch.int64, device=row.device)
    seen = row[idx]
    out = row.clone()
    out[idx] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


def _sample_row(row: torch.Tensor, p: SamplingParams, u: float) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then inverse-CDF with ``u``; returns a 0-dim token id.

    All filters work in one stable descending order (ties broken by token id), so what is kept
    and which token ``u`` lands on are fully defined even when logits tie.
    """
    # Subtracting the max first keeps logits / tiny temperature from overflowing to inf.
    scaled = (row - row.max()) / p.temperature  # [vocab]
    sorted_logits, order = torch.sort(scaled, descending=True, stable=True)
    if p.top_k > 0:
        sorted_logits = sorted_logits[: p.top_k]
        order = order[: p.top_k]
    probs = torch.softmax(sorted_logits, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if p.top_p < 1.0:
        # Keep a token while the mass before it is still short of top_p: the smallest prefix that
        # reaches top_p. Index 0 has mass-before 0, so at least one token always survives.
        # Exclusive cumsum built from the inclusive one stays monotone, so `keep` stays a prefix.
        cum = torch.cumsum(probs, dim=-1)
        before = torch.cat([cum.new_zeros(1), cum[:-1]])
        keep &= before < p.top_p
    if p.min_p > 0.0:
        keep &= probs >= p.min_p * probs[0]
    keep[0] = True
    # float64 cumsum: over a 100k+ vocab, float32 rounding would skew the tail of the distribution.
    cdf = torch.cumsum(torch.where(keep, probs, 0.0).to(torch.float64), dim=-1)
    target = (cdf[-1] * u).reshape(1)
    # First index whose cumulative mass exceeds u * total. Every filter keeps a prefix of the sorted
    # order, so clamping to the last kept index only guards against rounding at the very end.
    last_kept = keep.sum() - 1
    pick = torch.minimum(torch.searchsorted(cdf, target, right=True), last_kept)
    return order[pick[0]]
