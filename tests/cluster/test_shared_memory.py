"""Two stages on one machine exchange small steps through shared memory (node/peer_ring.py): the tokens
are those of the single-process engine, with a repetition penalty too (its rows wait for the tokens on
the host), and a node started with --no-shared-memory gets its steps as bytes instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.api import TensorfleetClient
from coordinator.local_cluster import LocalCluster, NodeSpec
from engine.llm import LLM, EngineConfig
from engine.sampling import SamplingParams
from tests.cluster.test_codec_link import link_traffic

PROMPTS = ["What is the capital of France?", "Name a famous painter."]
TOKENS = 12
PENALTY = 1.5


def run(tmp_path: Path, model: Path, *, shared_memory: bool) -> tuple[list, list, dict, list]:
    nodes = [NodeSpec(standby=False, devices="cpu", model_dir=str(model), shared_memory=shared_memory)
             for _ in range(2)]
    with LocalCluster(tmp_path, model=str(model), nodes=nodes, coordinator_args=[
            "--stages", "2", "--slots", "2", "--max-seq-len", "256"]) as c, TensorfleetClient(c.address) as client:
        ranges = [(s.layers.start, s.layers.end) for s in client.status().stages]
        greedy = [client.generate(p, max_tokens=TOKENS, ignore_eos=True).token_ids for p in PROMPTS]
        penalized = [client.generate(p, max_tokens=TOKENS, ignore_eos=True, repetition_penalty=PENALTY).token_ids
                     for p in PROMPTS]
        traffic = link_traffic(c, messages=2 * len(PROMPTS) * TOKENS)
    return greedy, penalized, traffic, ranges


@pytest.fixture(scope="module")
def engine_tokens(embedded_model_dir) -> tuple[list, list]:  # noqa: ANN001
    llm = LLM(EngineConfig(model=str(embedded_model_dir), num_slots=2, max_seq_len=256))
    greedy = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=TOKENS, ignore_eos=True),
                                                chat=True)]
    penalized = [o.token_ids for o in llm.generate(
        PROMPTS, SamplingParams(max_tokens=TOKENS, ignore_eos=True, repetition_penalty=PENALTY), chat=True)]
    assert greedy != penalized  # the penalty changes tokens: the test sees that it was applied
    return greedy, penalized


def test_steps_through_shared_memory_give_the_engines_tokens(tmp_path: Path, embedded_model_dir,  # noqa: ANN001
                                                             engine_tokens: tuple[list, list]) -> None:
    greedy, penalized, traffic, ranges = run(tmp_path, embedded_model_dir, shared_memory=True)
    assert len(ranges) == 2
    assert (greedy, penalized) == engine_tokens
    # Decode steps (one row each) went through the ring: counted with their raw size, no bytes on the wire;
    # prefills (longer than the ring's 2 rows) as bytes.
    raw, wire, messages = traffic["shared"]
    assert messages >= 2 * len(PROMPTS) * (TOKENS - 1) and raw > 0 and wire == 0, traffic
    assert traffic["exact"][2] >= 2 * len(PROMPTS), traffic

def test_a_node_without_shared_memory_gets_bytes(tmp_path: Path, embedded_model_dir,  # noqa: ANN001
                                                 engine_tokens: tuple[list, list]) -> None:
    greedy, penalized, traffic, _ = run(tmp_path, embedded_model_dir, shared_memory=False)
    assert (greedy, penalized) == engine_tokens
    assert "shared" not in traffic and traffic["exact"][2] >= 2 * len(PROMPTS) * TOKENS
