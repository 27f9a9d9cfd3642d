"""Pipelined decode (engine/llm.py ``pipelined_decode``): each step launched before the previous step's
tokens reach the host must give exactly the tokens of the step-by-step loop: greedy and seeded sampling,
sequences ending by length, by EOS and by stop token at different steps, more prompts than slots."""

from __future__ import annotations

import pytest

from engine.llm import LLM, EngineConfig
from engine.sampling import SamplingParams
from tests.engine.reference import make_random_model

PROMPTS = [[5, 9, 2, 7], [11, 3], [8, 8, 1, 4, 6, 2, 9], [3], [40, 41, 42]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):  # noqa: ANN001, ANN201
    model_dir = make_random_model("llama-gqa-tied", tmp_path_factory.mktemp("pipelined"))
    return {flag: LLM(EngineConfig(model=str(model_dir), num_slots=3, max_seq_len=64, pipelined_decode=flag),
                      load_tokenizer=False) for flag in (False, True)}


def params_for(stop_from: list[int]) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=6 + i, stop_token_ids=tuple(stop_from[i:i + 1]),
                           temperature=0.0 if i % 2 else 0.8, seed=100 + i) for i in range(len(PROMPTS))]


def test_pipelined_decode_gives_the_same_tokens(engines) -> None:  # noqa: ANN001
    plain = engines[False].generate(PROMPTS, params_for([]))
    # stop tokens taken from the plain run's outputs, so that some sequences end early, mid-step
    stops = [plain[0].token_ids[2], plain[1].token_ids[0], -1, plain[3].token_ids[4], -1]
    stops = [t if t >= 0 else 10**6 for t in stops]
    for params in (params_for([]), params_for(stops)):
        want = engines[False].generate(PROMPTS, params)
        got = engines[True].generate(PROMPTS, params)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    assert {w.finish_reason for w in want} == {"stop", "length"}
