"""A tensor-parallel group that spans node daemons (coordinator --tp-across-nodes): its ranks meet in the
leading node's rendezvous store and run one stage together, over gloo here (NCCL on GPUs)."""

from __future__ import annotations

import signal
from pathlib import Path

from client.api import TensorfleetClient
from client.workload import StreamingWorkload
from coordinator.local_cluster import LocalCluster, NodeSpec
from engine.llm import LLM, EngineConfig
from engine.sampling import SamplingParams

COUNT, TOKENS = 8, 12


def test_a_group_across_nodes_serves_the_engines_tokens_and_survives_losing_a_rank(tmp_path: Path) -> None:
    """Three one-CPU nodes; the model runs as one tp=2 stage whose two ranks are on two nodes (the second
    runs a peer rank and serves no data plane), the third is spare. Greedy tokens equal the single-process
    engine's. Then the node holding rank 1 is killed while 8 streams (4 greedy, 4 seeded) are under way:
    the group re-forms with the spare, and every stream ends with the tokens of an undisturbed run."""
    from tests.engine.reference import make_random_model
    from tests.engine.test_fidelity import random_prompts

    model = make_random_model("llama-gqa-tied", tmp_path / "m")
    prompts = random_prompts(320, [5, 17, 30])
    llm = LLM(EngineConfig(model=str(model), num_slots=4, max_seq_len=256), load_tokenizer=False)
    want = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=TOKENS, ignore_eos=True))]
    nodes = [NodeSpec(standby=False, devices="cpu", model_dir=str(model)) for _ in range(3)]
    with LocalCluster(tmp_path / "run", model=str(model), nodes=nodes,
                      coordinator_args=["--stages", "1", "--slots", str(COUNT), "--max-seq-len", "256",
                                        "--tp-across-nodes", "--heartbeat-ms", "200",
                                        "--heartbeat-timeout-ms", "1000"]) as c:
        with TensorfleetClient(c.address) as client:
            st = client.status()
            (stage,) = st.stages
            assert [m.tp_rank for m in stage.members] == [0, 1]
            assert len({m.node_id for m in stage.members}) == 2, stage
            names = {n.node_id: n.info.name for n in st.nodes}
            got = [client.generate(p, max_tokens=TOKENS, ignore_eos=True).token_ids for p in prompts]
        leader, peer = (names[m.node_id] for m in stage.members)
        assert got == want
        assert "tp=2) ready at" in c.log(leader) and "tp=2) ready (ranks 1)" in c.log(peer)

        def workload(tag: str) -> StreamingWorkload:
            return StreamingWorkload(c.address, prompts, count=COUNT, max_tokens=TOKENS, seeded=range(4, 8),
                                     tag=tag, timeout=240)

        reference = workload("ref").run()
        assert not reference.lost() and all(len(t) == TOKENS for t in reference.outputs())
        faulted = workload("kill").start()
        assert faulted.wait_tokens(COUNT * TOKENS // 3), "the workload did not get going"
        c.signal_node(peer, signal.SIGKILL)  # the daemon and its executor: rank 1 is gone at once
        faulted.join()
        assert not faulted.lost(), [r.error for r in faulted.lost()]
        assert faulted.outputs() == reference.outputs()
        with TensorfleetClient(c.address) as client:  # the streams could not end without the new group
            st = client.status()
        (stage,) = st.stages
        members = [m.node_id for m in stage.members]
        assert len(set(members)) == 2 and peer not in {names.get(m) for m in members}, st
