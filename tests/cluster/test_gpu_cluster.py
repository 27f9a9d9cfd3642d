"""A local cluster on one GPU (skipped without CUDA): one node, or two nodes each an executor on cuda:0
serving a random-init Llama in bf16 as two pipeline stages; greedy output equals the single-process
engine on the same GPU and dtype (with lookahead: on one stage, the rows sent ahead take their tokens on
the device; on two, from the result passed back to stage 0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.api import TensorfleetClient
from coordinator.local_cluster import LocalCluster, NodeSpec
from engine.llm import LLM, EngineConfig
from engine.sampling import SamplingParams
from tests.engine.reference import make_random_model
from tests.engine.test_fidelity import random_prompts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stages", [1, 2])
def test_stages_on_one_gpu_match_the_engine(tmp_path: Path, stages: int) -> None:
    model = make_random_model("llama3-rope", tmp_path / "m")
    prompts = random_prompts(300, [6, 25, 40])
    llm = LLM(EngineConfig(model=str(model), device="cuda", dtype="bfloat16", num_slots=4, max_seq_len=256),
              load_tokenizer=False)
    # One prompt at a time on both sides: bf16 GPU kernels are not batch-invariant, so a batch of 3 can
    # round differently from 3 batches of 1 and greedy decoding may then part at a near-tie.
    want = [llm.generate([p], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids for p in prompts]
    nodes = [NodeSpec(devices="cuda:0", model_dir=str(model)),
             NodeSpec(devices="cuda:0", cache_dir=str(tmp_path / "c"))][:stages]
    args = ["--stages", str(stages), "--slots", "4", "--max-seq-len", "256", "--dtype", "bfloat16", "--no-http"]
    with LocalCluster(tmp_path / "run", model=str(model), nodes=nodes, coordinator_args=args) as cluster:
        with TensorfleetClient(cluster.address) as client:
            assert len(client.status().stages) == stages
            got = [client.generate(p, max_tokens=24, ignore_eos=True).token_ids for p in prompts]
    assert got == want
