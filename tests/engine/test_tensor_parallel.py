"""Tensor parallelism over real gloo processes against the Hugging Face reference (fidelity (c)),
plus the sharding math with fake ranks in one process and the divisibility errors.
"""

from __future__ import annotations

import queue
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.model_source import load_hf_config
from engine.parallel import ShardedLinear, TPGroup, VocabParallelEmbedding, kv_head_range
from engine.stage import StageModel
from tests.engine.reference import load_reference, make_random_model, reference_greedy, reference_logits
from tests.engine.test_fidelity import NEW_TOKENS, assert_logits_close, random_prompts

TIMEOUT_S = 300


def _tp_worker(rank: int, world: int, port: int, model_dir: str, stages: int, prompts: list, results) -> None:  # noqa: ANN001
    from engine.llm import LLM, EngineConfig
    from engine.sampling import SamplingParams

    try:
        torch.set_num_threads(1)  # world processes share 2 cores
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT_S))
        llm = LLM(EngineConfig(model=model_dir, stages=stages, num_slots=4, max_seq_len=160),
                  tp=TPGroup.from_group(), load_tokenizer=False)
        logits = [llm.forward([0], [0], [ids], all_logits=True)[0] for ids in prompts]
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        results.put((rank, "ok", (logits, [o.token_ids for o in outs])))
    except BaseException:  # noqa: BLE001 - the parent reports the child's traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _tp_serve(rank: int, jobs, results) -> None:  # noqa: ANN001
    """A worker process: runs rank ``rank`` of each job from ``jobs`` (a fresh process group each time) until
    None comes."""
    while (job := jobs.get()) is not None:
        _tp_worker(rank, *job, results)


class TPWorkers:
    """Worker processes for the gloo runs, started once for the module and reused (rank r of every run is
    worker r): each start imports torch and the engine, seconds of CPU, and the module's runs would start 15.
    Each run is still its own process group on its own free port; a run that fails or times out takes the
    workers down with it (the next run starts new ones), and the workers must all exit with 0 (``close``)."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.procs: list = []
        self.jobs: list = []
        self.exit_codes: list[int | None] = []  # of the workers already stopped

    def run(self, model_dir: str, world: int, prompts: list, port: int, *, stages: int = 1) -> list:
        while len(self.procs) < world:
            jobs = self.ctx.Queue()
            proc = self.ctx.Process(target=_tp_serve, args=(len(self.procs), jobs, self.results))
            proc.start()
            self.procs.append(proc)
            self.jobs.append(jobs)
        for rank in range(world):
            self.jobs[rank].put((world, port, model_dir, stages, prompts))
        got = {}
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while len(got) < world:
                try:
                    rank, status, payload = self.results.get(timeout=1)
                except queue.Empty:
                    dead = {r: p.exitcode for r, p in enumerate(self.procs) if not p.is_alive()}
                    assert not dead, f"worker(s) exited during the run: {dead}"
                    assert time.monotonic() < deadline, f"no result from every rank within {TIMEOUT_S} s: {sorted(got)}"
                    continue
                assert status == "ok", f"rank {rank} failed:\n{payload}"
                got[rank] = payload
        except BaseException:
            self.stop(kill=True)  # ranks may be stuck in a collective: none is reused
            raise
        assert all(p.is_alive() for p in self.procs), [p.exitcode for p in self.procs]
        return [got[r] for r in range(world)]

    def stop(self, *, kill: bool = False) -> None:
        """Stop the workers: asked to (their exit codes are kept for ``close``), or killed after a failed run
        (with a new results queue: the old one may hold that run's late results)."""
        for proc, jobs in zip(self.procs, self.jobs, strict=True):
            if kill:
                proc.kill()
            else:
                jobs.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
            if not kill:
                self.exit_codes.append(proc.exitcode)
        self.procs, self.jobs = [], []
        if kill:
            self.results = self.ctx.Queue()

    def close(self) -> None:
        self.stop()
        assert self.exit_codes == [0] * len(self.exit_codes), f"worker exit codes: {self.exit_codes}"


@pytest.fixture(scope="module")
def workers():  # noqa: ANN201 - a TPWorkers
    w = TPWorkers()
    yield w
    w.close()


def run_tp(workers: TPWorkers, model_dir: str, world: int, prompts: list, free_port: int, *, stages: int = 1) -> list:
    return workers.run(model_dir, world, prompts, free_port, stages=stages)


def check_against_reference(ref, per_rank: list, prompts: list) -> None:  # noqa: ANN001
    for logits, tokens in per_rank:  # every rank ends with the full logits and the same tokens
        for row, ids, toks in zip(logits, prompts, tokens, strict=True):
            assert_logits_close(row, reference_logits(ref, ids))
            assert toks == reference_greedy(ref, ids, NEW_TOKENS)


@pytest.mark.parametrize("name,stages", [("llama-gqa-tied", 1), ("qwen2-bias", 2), ("opt", 1),
                                         ("llama3-rope", 1)])
def test_tp2_gloo_matches_transformers(workers, tmp_path, free_port: int, name: str, stages: int) -> None:  # noqa: ANN001
    model_dir = make_random_model(name, tmp_path / name)
    prompts = random_prompts(load_hf_config(model_dir)["vocab_size"], [9, 23])
    per_rank = run_tp(workers, str(model_dir), 2, prompts, free_port, stages=stages)
    check_against_reference(load_reference(model_dir), per_rank, prompts)


def test_tp4_replicates_kv_heads(workers, tmp_path, free_port: int) -> None:  # noqa: ANN001
    """llama3-rope has 2 kv heads: at tp=4 each kv head is held by two ranks."""
    model_dir = make_random_model("llama3-rope", tmp_path / "m")
    prompts = random_prompts(load_hf_config(model_dir)["vocab_size"], [13])
    per_rank = run_tp(workers, str(model_dir), 4, prompts, free_port)
    check_against_reference(load_reference(model_dir), per_rank, prompts)


def test_tp3_embedded_model(workers, embedded_model_dir, free_port: int) -> None:  # noqa: ANN001
    """SmolLM2 has 9 heads and 3 kv heads, so 3 is its tensor-parallel size (2 does not divide 9)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    prompts = [tok.encode("The capital of France is")]
    per_rank = run_tp(workers, str(embedded_model_dir), 3, prompts, free_port)
    check_against_reference(load_reference(embedded_model_dir), per_rank, prompts)


def test_tp_size_not_dividing_heads_is_a_clear_error(embedded_model_dir) -> None:  # noqa: ANN001
    cfg = ModelConfig.from_hf(load_hf_config(embedded_model_dir))
    with pytest.raises(ConfigError, match=r"num_attention_heads=9 is not divisible by tp=2"):
        StageModel(cfg, start=0, end=2, tp=TPGroup(rank=0, size=2))


def test_kv_head_ranges() -> None:
    assert [kv_head_range(4, TPGroup(rank=r, size=2)) for r in range(2)] == [(0, 2), (2, 4)]
    assert [kv_head_range(2, TPGroup(rank=r, size=4)) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(ConfigError, match="tp=3 must be a multiple of num_key_value_heads=2"):
        kv_head_range(2, TPGroup(rank=0, size=3))


def test_fake_ranks_row_and_column_parallel_sum_to_full() -> None:
    """Shards computed rank by rank in one process recombine to the unsharded result."""
    torch.manual_seed(0)
    w1, w2, x = torch.randn(12, 8), torch.randn(8, 12), torch.randn(3, 8)
    full = x @ w1.T @ w2.T
    partials = []
    for rank in range(2):
        tp = TPGroup(rank=rank, size=2)
        col = ShardedLinear(8, 6, bias=False, tp=tp)
        row = ShardedLinear(6, 8, bias=False, tp=tp)  # reduce_results off: we sum the partials by hand
        col.weight.copy_(w1[rank * 6:(rank + 1) * 6])
        row.weight.copy_(w2[:, rank * 6:(rank + 1) * 6])
        partials.append(row(col(x)))
    torch.testing.assert_close(sum(partials), full, rtol=1e-5, atol=1e-5)


class PartialTP(TPGroup):
    """A fake rank whose collectives return this rank's partial result (the test sums the ranks)."""

    def all_reduce(self, x: torch.Tensor, key: object = None) -> torch.Tensor:
        return x


def test_vocab_parallel_embedding_pads_and_masks() -> None:
    """A vocabulary of 10 over 4 ranks pads to 12; each rank answers only its own rows."""
    table = torch.randn(10, 4)
    ids = torch.tensor([[0, 3, 9, 5]])
    total = torch.zeros(1, 4, 4)
    for rank in range(4):
        emb = VocabParallelEmbedding(10, 4, tp=PartialTP(rank=rank, size=4), dtype=torch.float32)
        start, stop = emb.shard_rows()
        assert emb.per_rank == 3 and (start, stop) == (3 * rank, min(3 * rank + 3, 10))
        emb.weight[: stop - start] = table[start:stop]
        total += emb(ids)
    torch.testing.assert_close(total, table[ids])
