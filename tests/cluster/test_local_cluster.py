"""Tier 3: a real cluster on loopback: a coordinator and 3 nodes started through the public CLIs.

Node 0 serves from its own --model-dir; nodes 1 and 2 fetch their weights from the coordinator; node 2
runs 2 CPU executors that form a tensor-parallel stage (tp=3 is SmolLM2's smallest split: 9 heads, so
its pair runs... see test_tp_stage). Greedy output equals the single-process engine for 8 prompts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.api import TensorfleetClient
from coordinator.local_cluster import LocalCluster, NodeSpec
from engine.llm import LLM, EngineConfig
from engine.sampling import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
    "Name a famous painter.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Translate 'good morning' into Spanish.",
]
MAX_TOKENS = 16


def single_process_tokens(model_dir: Path) -> list[list[int]]:
    llm = LLM(EngineConfig(model=str(model_dir), num_slots=8, max_seq_len=512))
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), chat=True)
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def reference_job(embedded_model_dir):  # noqa: ANN001, ANN201 - a Future of single_process_tokens
    """The single-process engine's tokens, computed in a thread while the cluster's processes start (the
    cluster fixture asks for this one first): together they take less time than one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(single_process_tokens, embedded_model_dir)


@pytest.fixture(scope="module")
def reference(reference_job) -> list[list[int]]:  # noqa: ANN001
    return reference_job.result()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir, reference_job) -> LocalCluster:  # noqa: ANN001
    work = tmp_path_factory.mktemp("cluster")
    nodes = [NodeSpec(standby=False, devices="cpu", model_dir=str(embedded_model_dir)),
             NodeSpec(standby=False, devices="cpu", cache_dir=str(work / "cache1")),
             NodeSpec(standby=False, devices="cpu:3", cache_dir=str(work / "cache2"))]
    # Slots derived from memory (capped at 8); a step carries at most 16 tokens, so the chat prompts (about
    # 35 tokens) are prefilled in chunks, beside the decode rows of the requests already running.
    c = LocalCluster(work, model=str(embedded_model_dir), nodes=nodes,
                     coordinator_args=["--stages", "3", "--max-slots", "8", "--max-step-tokens", "16",
                                       "--max-seq-len", "512"])
    c.start(timeout_s=300)
    yield c
    c.stop()


def test_status_shows_three_stages_and_a_tp_group(cluster: LocalCluster) -> None:
    with TensorfleetClient(cluster.address) as client:
        status = client.status()
    assert len(status.nodes) == 3
    assert [s.layers.start for s in status.stages][0] == 0 and status.stages[-1].layers.end == 30
    assert len(status.stages) == 3
    assert sorted(len(s.members) for s in status.stages) == [1, 1, 3]
    assert all(s.address for s in status.stages)
    assert status.max_batch_size == 8 and status.max_step_tokens == 16 and status.micro_batches == 3
    assert all(s.num_slots == 8 and s.slots_fit >= 8 for s in status.stages)


def test_greedy_output_equals_single_process(cluster: LocalCluster, reference: list[list[int]]) -> None:
    with TensorfleetClient(cluster.address) as client:
        got = [client.generate(p, max_tokens=MAX_TOKENS).token_ids for p in PROMPTS]
    assert got == reference


def test_concurrent_requests_in_micro_batches_equal_single_process(cluster: LocalCluster,
                                                                   reference: list[list[int]]) -> None:
    """All 8 prompts at once: they share batches, up to 3 micro-batches are in flight (one per stage), and
    prompt chunks ride in the same steps as other requests' decode rows."""
    from concurrent.futures import ThreadPoolExecutor

    with TensorfleetClient(cluster.address) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: client.generate(p, max_tokens=MAX_TOKENS).token_ids, PROMPTS))
    assert got == reference


def test_streaming_delivers_tokens_incrementally(cluster: LocalCluster, reference: list[list[int]]) -> None:
    with TensorfleetClient(cluster.address) as client:
        deltas = list(client.generate_stream(PROMPTS[1], max_tokens=MAX_TOKENS))
    assert len(deltas) >= 2 and deltas[-1].finish_reason is not None
    assert [t for d in deltas for t in d.token_ids] == reference[1]


def test_nodes_that_fetched_weights_reuse_their_cache_when_they_join_again(
        cluster: LocalCluster, embedded_model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    assert "0.0 MiB fetched" not in cluster.log("node1")  # the first join downloaded its stage
    again = LocalCluster(tmp_path, model=str(embedded_model_dir), nodes=cluster.node_specs,
                         coordinator_args=["--stages", "3", "--slots", "8", "--max-seq-len", "512"])
    with again:
        for name in ("node1", "node2"):
            assert " 0.0 MiB fetched" in again.log(name), again.log(name)
        with TensorfleetClient(again.address) as client:
            assert client.generate(PROMPTS[0], max_tokens=4).completion_tokens == 4


@pytest.mark.parametrize("tp_codec", ["exact", "int4"])
def test_two_cpu_executors_form_a_tensor_parallel_stage(tmp_path: Path, tp_codec: str) -> None:
    """A 4-head random-init Llama: a node with cpu:2 serves a tp=2 stage; token ids in, token ids out.
    Exact all-reduces give the engine's tokens; int4-compressed ones (every all-reduce, --tp-codec) must
    change them, which shows the stage's group used the codec (its accuracy: tests/engine/test_collectives.py)."""
    from tests.engine.reference import make_random_model
    from tests.engine.test_fidelity import random_prompts

    model = make_random_model("llama-gqa-tied", tmp_path / "m")
    prompts = random_prompts(320, [5, 17, 30])
    llm = LLM(EngineConfig(model=str(model), num_slots=4, max_seq_len=256), load_tokenizer=False)
    want = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))]
    nodes = [NodeSpec(standby=False, devices="cpu", model_dir=str(model)),
             NodeSpec(standby=False, devices="cpu:2", cache_dir=str(tmp_path / "c"))]
    with LocalCluster(tmp_path / "run", model=str(model), nodes=nodes,
                      coordinator_args=["--stages", "2", "--slots", "4", "--max-seq-len", "256",
                                        "--tp-codec", tp_codec, "--tp-codec-min-elements", "1"]) as c:
        with TensorfleetClient(c.address) as client:
            assert sorted(len(s.members) for s in client.status().stages) == [1, 2]
            got = [client.generate(p, max_tokens=16, ignore_eos=True).token_ids for p in prompts]
    assert [len(t) for t in got] == [16] * len(prompts)
    assert (got == want) == (tp_codec == "exact")


def test_several_steps_in_flight_through_the_pipeline(tmp_path: Path) -> None:
    """Two micro-batches (one sequence each) in flight at once through 2 stages: each gets exactly the
    tokens it gets alone (the transport the scheduler's micro-batching builds on)."""
    from node.stream import StageStream
    from node.wire import sampling_to_proto
    from tensorfleet.v1 import common_pb2, node_pb2
    from tests.engine.reference import make_random_model
    from tests.engine.test_fidelity import random_prompts

    model = make_random_model("qwen2-bias", tmp_path / "m")
    prompts = random_prompts(256, [9, 21])
    llm = LLM(EngineConfig(model=str(model), num_slots=2, max_seq_len=128), load_tokenizer=False)
    want = [llm.generate([p], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids for p in prompts]
    nodes = [NodeSpec(standby=False, devices="cpu", model_dir=str(model)) for _ in range(2)]
    with LocalCluster(tmp_path / "run", model=str(model), nodes=nodes,
                      coordinator_args=["--stages", "2", "--slots", "4", "--max-seq-len", "128"]) as c:
        with TensorfleetClient(c.address) as client:
            status = client.status()
        stream = StageStream(status.stages[0].address, secret=c.stage_key(status))
        greedy = sampling_to_proto(SamplingParams(max_tokens=12))

        def step(step_id: int, slot: int, start: int, ids: list[int]) -> node_pb2.StepMessage:
            msg = node_pb2.StepMessage(epoch=common_pb2.PlacementEpoch(value=status.epoch.value), step_id=step_id)
            msg.sequences.add(request_id=str(slot), slot=2 + slot, start=start, token_ids=ids, sampling=greedy)
            return msg

        got: list[list[int]] = [[], []]
        inputs, starts, step_id = [list(p) for p in prompts], [0, 0], 1000
        for _ in range(12):
            futures = []
            for slot in (0, 1):  # both submitted before either result is read
                futures.append(stream.submit(step(step_id, slot, starts[slot], inputs[slot])))
                step_id += 1
            for slot, fut in enumerate(futures):
                result = fut.result(timeout=60)
                assert not result.error, result.error
                token = result.tokens[0].token_id
                got[slot].append(token)
                starts[slot] += len(inputs[slot])
                inputs[slot] = [token]
        stream.close()
    assert got == want


def test_executors_exit_when_their_node_daemon_is_killed(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    from tests.engine.reference import make_random_model

    model = make_random_model("llama-gqa-tied", tmp_path / "m")
    nodes = [NodeSpec(devices="cpu:2", model_dir=str(model))]  # with the standby executor: it must exit too
    with LocalCluster(tmp_path / "run", model=str(model), nodes=nodes,
                      coordinator_args=["--slots", "2", "--max-seq-len", "64"]) as c:
        daemon = c.procs["node0"]
        children = subprocess.run(["pgrep", "-P", str(daemon.pid)], capture_output=True, text=True).stdout.split()
        executors = [int(p) for p in children
                     if "spawn_main" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")
                     and "resource_tracker" not in open(f"/proc/{p}/cmdline").read()]
        assert len(executors) == 3  # the stage's 2 executors and the standby kept ready for a failover
        os.kill(daemon.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read().lower()
                  for p in executors):
            assert time.monotonic() < deadline, "executors outlived their daemon"
            time.sleep(0.2)


def test_a_disconnected_client_frees_its_slot_at_once(cluster: LocalCluster) -> None:
    import time

    with TensorfleetClient(cluster.address) as client:
        stream = client.generate_stream(PROMPTS[2], max_tokens=450, ignore_eos=True)  # 15+ s if never cancelled
        next(stream)
        next(stream)
        busy = client.status()
        assert busy.requests_running == 1 and busy.slots_free == busy.max_batch_size - 1
        stream.close()  # the client goes away mid-generation
        deadline = time.monotonic() + 10
        while (status := client.status()).slots_free != status.max_batch_size:
            assert time.monotonic() < deadline, f"the slot was not freed: {status}"
            time.sleep(0.05)
        assert status.requests_running == 0
        assert client.generate(PROMPTS[0], max_tokens=4).completion_tokens == 4  # and the cluster serves on
