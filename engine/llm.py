"""The single-process generate API: a model split into one or more stages chained in this process.

Used by tests, benchmarks and ``tensorfleet-generate``. Requests share a batch: new requests are
prefilled together, then every running sequence decodes one token per step; a finished sequence frees
its slot at once and a waiting request takes it. Under tensor parallelism every rank runs the same loop
(SPMD): logits are gathered on all ranks and the sampler is deterministic, so the ranks agree.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.detokenize import IncrementalDetokenizer
from engine.errors import ConfigError
from engine.graphs import DecodeGraphs, graphs_pay
from engine.kv_cache import KVCache, KVCacheSpec, available_memory, slots_for_memory
from engine.model_source import load_hf_config, resolve_model
from engine.parallel import TPGroup
from engine.sampling import SamplingParams, finish_reason, resolve_seed, sample
from engine.stage import StageModel, parse_dtype
from engine.transfer import tokens_to_host
from engine.weights import WeightReader


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: str | None = None  # HF directory, .gguf file, or None for the embedded default
    dtype: str = "float32"
    device: str = "cpu"
    stages: int = 1  # pipeline stages chained in this process (layers split evenly)
    max_seq_len: int = 2048
    num_slots: int | None = None  # None: as many as fit in kv_memory_fraction of free memory
    kv_memory_fraction: float = 0.3
    max_slots: int = 64
    cache_dir: str | None = None
    optimize_kernels: bool = True  # e.g. oneDNN weights on CPU fp32; False keeps plain torch.nn.functional
    cuda_graphs: bool = True  # decode steps as CUDA graphs where they pay (engine/graphs.py)
    fused_kernels: bool = True  # engine/kernels.py on CUDA (with Triton)
    # Launch each decode step before the previous one's tokens reach the host (its input is that step's
    # output on the device), so the GPU never waits for the host's per-token work; None: on CUDA.
    pipelined_decode: bool | None = None

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.stages < 1:
            raise ConfigError(f"stages={self.stages} must be >= 1")
        if self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len={self.max_seq_len} must be >= 2")
        if self.num_slots is not None and self.num_slots < 1:
            raise ConfigError(f"num_slots={self.num_slots} must be >= 1")


@dataclass
class SeqState:
    request_id: int
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    seed: int
    slot: int = -1
    cached: int = 0  # tokens whose k/v are in the slot
    finish_reason: str | None = None
    first_token_time: float | None = None
    detok: IncrementalDetokenizer | None = None  # only with stop strings

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclass
class Completion:
    request_id: int
    prompt_tokens: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    time_to_first_token: float = 0.0


# Transforms the hidden states [N, hidden] leaving stage i (first argument) before they enter stage i+1.
Boundary = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class StepStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0


def even_split(num_layers: int, stages: int) -> list[tuple[int, int]]:
    if not 1 <= stages <= num_layers:
        raise ConfigError(f"stages={stages} must be between 1 and the model's {num_layers} layers")
    bounds = [round(i * num_layers / stages) for i in range(stages + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class LLM:
    def __init__(self, config: EngineConfig | None = None, *, tp: TPGroup | None = None,
                 layer_ranges: Sequence[tuple[int, int]] | None = None, load_tokenizer: bool = True) -> None:
        self.config = config or EngineConfig()
        source = resolve_model(self.config.model, cache_dir=self.config.cache_dir)
        self.model_dir, self.model_name = Path(source.path), source.name
        self.model_cfg = ModelConfig.from_hf(load_hf_config(self.model_dir))
        dtype, device = parse_dtype(self.config.dtype), torch.device(self.config.device)
        ranges = list(layer_ranges or even_split(self.model_cfg.num_layers, self.config.stages))
        self._check_ranges(ranges)
        reader = WeightReader(self.model_dir)
        self.stages: list[StageModel] = []
        for start, end in ranges:
            stage = StageModel(self.model_cfg, start=start, end=end, tp=tp, dtype=dtype, device=device)
            stage.load(reader, progress=True)
            self.stages.append(stage)
        self.num_slots = self.config.num_slots or self._slots_from_memory(device)
        if self.config.optimize_kernels:
            for stage in self.stages:
                stage.optimize_kernels(fused=self.config.fused_kernels)
        self.pipelined = (self.config.pipelined_decode if self.config.pipelined_decode is not None
                          else device.type == "cuda")
        use_graphs = self.config.cuda_graphs and all(graphs_pay(s) for s in self.stages)
        self.caches: list[KVCache] = [s.new_cache(num_slots=self.num_slots, max_seq_len=self.config.max_seq_len,
                                                  spare_slots=1 if use_graphs else 0) for s in self.stages]
        self.graphs = ([DecodeGraphs(s, c) for s, c in zip(self.stages, self.caches, strict=True)]
                       if use_graphs else None)
        self.tokenizer = self._load_tokenizer() if load_tokenizer else None
        self.eos_ids = set(self.model_cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.stats = StepStats()

    def _check_ranges(self, ranges: list[tuple[int, int]]) -> None:
        expected = 0
        for start, end in ranges:
            if start != expected or end <= start:
                raise ConfigError(f"layer ranges {ranges} must be contiguous, non-empty and start at 0")
            expected = end
        if expected != self.model_cfg.num_layers:
            raise ConfigError(f"layer ranges {ranges} cover {expected} of {self.model_cfg.num_layers} layers")

    def _slots_from_memory(self, device: torch.device) -> int:
        per_slot = sum(s.kv_spec(num_slots=1, max_seq_len=self.config.max_seq_len).bytes_per_slot
                       for s in self.stages)
        return slots_for_memory(available_memory(device), self.config.kv_memory_fraction, per_slot,
                                max_slots=self.config.max_slots)

    def _load_tokenizer(self):  # noqa: ANN202 - transformers tokenizer type
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)

    def kv_cache_spec(self) -> list[KVCacheSpec]:
        return [c.spec for c in self.caches]

    # ----------------------------------------------------------------------------------------- inputs
    def encode(self, prompt: str | Sequence[int], *, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
        elif self.tokenizer is None:
            raise ConfigError("this engine was built without a tokenizer: pass token ids")
        elif chat and self.tokenizer.chat_template:
            ids = list(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                          add_generation_prompt=True, tokenize=True,
                                                          return_dict=False))
        else:
            ids = list(self.tokenizer.encode(prompt))
        if not ids:
            raise ConfigError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.model_cfg.vocab_size]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary of {self.model_cfg.vocab_size}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if self.tokenizer is not None else ""

    # ------------------------------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 | None = None, *, chat: bool = False,
                 on_token: Callable[[int, int], None] | None = None,
                 boundary: Boundary | None = None) -> list[Completion]:
        """Generate for every prompt; ``on_token(request_index, token_id)`` streams tokens as they come.
        ``boundary`` transforms the hidden states between stages (see ``forward``)."""
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        seqs = [self._new_sequence(i, self.encode(p, chat=chat), sp) for i, (p, sp) in enumerate(zip(prompts, plist,
                                                                                                   strict=True))]
        waiting, running = deque(seqs), []
        free = list(range(self.num_slots - 1, -1, -1))
        start_time = time.perf_counter()
        while waiting or running:
            admitted = []
            while waiting and free:
                seq = waiting.popleft()
                seq.slot = free.pop()
                admitted.append(seq)
            batch = admitted or running  # prefill newcomers first; decode otherwise
            if not admitted and self.pipelined and not any(r.params.repetition_penalty != 1.0 for r in batch):
                self._decode_pipelined(batch, on_token, start_time, boundary)
            else:
                self._step(batch, on_token, start_time, boundary)
            running = [s for s in running + admitted if s.finish_reason is None]
            free.extend(s.slot for s in batch if s.finish_reason is not None)
        return [self._completion(s, start_time) for s in seqs]

    def _new_sequence(self, request_id: int, ids: list[int], params: SamplingParams) -> SeqState:
        if len(ids) + params.max_tokens > self.config.max_seq_len:
            raise ConfigError(f"prompt of {len(ids)} tokens plus max_tokens={params.max_tokens} exceeds "
                              f"max_seq_len={self.config.max_seq_len}")
        # Stop strings are searched incrementally (a short window per token), not in the whole output.
        detok = IncrementalDetokenizer(self.tokenizer, params.stop) if params.stop and self.tokenizer else None
        return SeqState(request_id=request_id, prompt_len=len(ids), tokens=list(ids), params=params,
                        seed=resolve_seed(params), detok=detok)

    def _step(self, batch: list[SeqState], on_token: Callable[[int, int], None] | None, t0: float,
              boundary: Boundary | None = None) -> None:
        tick = time.perf_counter()
        new = [s.tokens[s.cached:] for s in batch]
        tokens = self._launch(batch, new, [s.cached for s in batch], boundary)
        self._complete(batch, tokens.tolist(), tick, on_token, t0, decode=all(len(x) == 1 for x in new))

    def _decode_pipelined(self, batch: list[SeqState], on_token: Callable[[int, int], None] | None, t0: float,
                          boundary: Boundary | None) -> None:
        """Decode ``batch`` until one of its sequences finishes, each step launched before the previous
        one's tokens are read (its input: those tokens, still on the device). A step is launched ahead
        only while no sequence can reach max_tokens in the step before it; a sequence that ends otherwise
        (EOS, a stop) drops the one token computed ahead for it."""
        tick = time.perf_counter()
        current = self._launch(batch, [s.tokens[-1:] for s in batch], [s.cached for s in batch], boundary)
        while True:
            fetch = tokens_to_host(current)  # before the next launch, so that it waits for this step only
            ahead = None
            if all(len(s.output) + 2 <= s.params.max_tokens for s in batch):
                ahead = self._launch(batch, current, [len(s.tokens) for s in batch], boundary, position_offset=1)
            self._complete(batch, fetch(), tick, on_token, t0, decode=True)
            tick = time.perf_counter()
            if ahead is None:
                return
            if any(s.finish_reason is not None for s in batch):
                self._complete(batch, ahead.tolist(), tick, on_token, t0, decode=True)  # the others' tokens
                return
            current = ahead

    def _launch(self, batch: list[SeqState], new: list[list[int]] | torch.Tensor, starts: list[int],
                boundary: Boundary | None, *, position_offset: int = 0) -> torch.Tensor:
        """One step's sampled tokens [B], left on the device. ``new``: each row's new tokens, or one token
        per row as a device tensor; ``position_offset`` 1 when the last token is not in ``tokens`` yet."""
        logits = self.forward([s.slot for s in batch], starts, new, boundary=boundary)
        return sample(logits, [s.params for s in batch], [s.seed for s in batch],
                      [len(s.tokens) + position_offset for s in batch],
                      [s.tokens for s in batch] if any(s.params.repetition_penalty != 1.0 for s in batch) else None)

    def _complete(self, batch: list[SeqState], tokens: list[int], tick: float,
                  on_token: Callable[[int, int], None] | None, t0: float, *, decode: bool) -> None:
        """Append each running row's token (rows that already finished drop theirs) and decide who ends."""
        now = time.perf_counter()
        live = [(seq, token) for seq, token in zip(batch, tokens, strict=True) if seq.finish_reason is None]
        if decode:
            self.stats.decode_tokens += len(live)
            self.stats.decode_seconds += now - tick
            self.stats.decode_steps += 1
        else:
            self.stats.prefill_tokens += sum(len(s.tokens) - s.cached for s in batch)
            self.stats.prefill_seconds += now - tick
        for seq, token in live:
            seq.cached = len(seq.tokens)
            seq.tokens.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now - t0
            if on_token is not None:
                on_token(seq.request_id, token)
            stopped = seq.detok.push(token)[1] if seq.detok is not None else False
            seq.finish_reason = finish_reason(token, len(seq.output), seq.params, self.eos_ids,
                                              stop_string_seen=stopped)

    def _completion(self, seq: SeqState, t0: float) -> Completion:
        text = seq.detok.text if seq.detok is not None else self.decode(seq.output)
        return Completion(request_id=seq.request_id, prompt_tokens=seq.tokens[: seq.prompt_len],
                          token_ids=seq.output, text=text, finish_reason=seq.finish_reason or "length",
                          time_to_first_token=seq.first_token_time or 0.0)

    def forward(self, slots: list[int], starts: list[int], new_tokens: list[list[int]] | torch.Tensor, *,
                all_logits: bool = False, boundary: Boundary | None = None) -> torch.Tensor:
        """One batch step through every stage: logits [B, vocab], or with ``all_logits`` [B, T, vocab]
        for every new token (rows shorter than T = the longest row are zero-padded).

        ``boundary(i, h)``, if given, replaces the hidden states ``h`` [N, hidden] leaving stage i before
        they enter stage i+1 (every stage but the last), e.g. to model a lossy wire codec between stages."""
        if isinstance(new_tokens, torch.Tensor):  # one token per row, already on the device
            lengths, h = [1] * len(slots), new_tokens
        else:
            lengths = [len(t) for t in new_tokens]
            h = torch.tensor([t for row in new_tokens for t in row], dtype=torch.long, device=self.stages[0].device)
        last = len(self.stages) - 1
        if self.graphs is not None and not all_logits and self.graphs[0].handles(lengths):
            for i, graphs in enumerate(self.graphs):
                h = graphs.run(slots, starts, h)
                if boundary is not None and i < last:
                    h = boundary(i, h)
            return h
        meta = self.stages[0].make_meta(slots, starts, lengths)
        for i, (stage, cache) in enumerate(zip(self.stages, self.caches, strict=True)):
            if h.device != stage.device:
                h = h.to(stage.device)
            h = stage(h, meta, cache, all_logits=all_logits)
            if boundary is not None and i < last:
                h = boundary(i, h)
        if not all_logits:
            return h
        out = h.new_zeros(len(lengths), max(lengths), h.shape[-1])
        for b, part in enumerate(h.split(lengths)):
            out[b, : lengths[b]] = part
        return out
