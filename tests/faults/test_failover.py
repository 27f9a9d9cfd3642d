"""Tier 4: faults on a real cluster (a coordinator and 4 CPU nodes on loopback, 2 stages, so 2 spares).

The tests run in file order on one cluster, each leaving it smaller: a node SIGKILLed mid-generation, a
node hung with SIGSTOP (and woken later), a node drained with `node leave`, the coordinator killed and
restarted, and finally no node left at all until a new one joins. Each time, 16 concurrent streaming
requests (8 greedy, 8 with seeded sampling) must all complete with exactly the tokens of the undisturbed
run. No timing is asserted here (scripts/bench_faults.py measures it).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.api import TensorfleetClient
from client.workload import StreamingWorkload
from coordinator.local_cluster import LocalCluster, NodeSpec
from node.stream import StageStream
from tensorfleet.v1 import common_pb2, node_pb2

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Name a famous painter."]
COUNT, TOKENS = 16, 16
SEEDED = range(8, 16)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir) -> LocalCluster:  # noqa: ANN001
    work = tmp_path_factory.mktemp("faults")
    nodes = [NodeSpec(devices="cpu", model_dir=str(embedded_model_dir)) for _ in range(4)]
    c = LocalCluster(work, model=str(embedded_model_dir), nodes=nodes, coordinator_args=[
        "--stages", "2", "--slots", str(COUNT), "--max-seq-len", "256", "--heartbeat-ms", "200",
        "--heartbeat-timeout-ms", "1000"])
    c.start(timeout_s=300)
    yield c
    c.stop()


def workload(cluster: LocalCluster, tag: str) -> StreamingWorkload:
    return StreamingWorkload(cluster.address, PROMPTS, count=COUNT, max_tokens=TOKENS, seeded=SEEDED, tag=tag,
                             timeout=240)


@pytest.fixture(scope="module")
def reference(cluster: LocalCluster) -> list[list[int]]:
    w = workload(cluster, "ref").run()
    assert not w.lost(), [r.error for r in w.lost()]
    assert all(len(t) == TOKENS for t in w.outputs())
    return w.outputs()


def status(cluster: LocalCluster):  # noqa: ANN201
    with TensorfleetClient(cluster.address, timeout=10) as client:
        return client.status()


def stage_node(cluster: LocalCluster, stage: int) -> str:
    """The name (node0..) of the node that leads ``stage``."""
    st = status(cluster)
    node_id = st.stages[stage].members[0].node_id
    return next(n.info.name for n in st.nodes if n.node_id == node_id)


def with_fault(cluster: LocalCluster, tag: str, inject) -> StreamingWorkload:  # noqa: ANN001
    """Run the workload and call ``inject`` once a third of its tokens have arrived."""
    w = workload(cluster, tag).start()
    assert w.wait_tokens(COUNT * TOKENS // 3), "the workload did not get going"
    inject()
    return w.join()


def assert_identical(w: StreamingWorkload, reference: list[list[int]]) -> None:
    assert not w.lost(), [r.error for r in w.lost()]
    changed = [i for i, (a, b) in enumerate(zip(w.outputs(), reference, strict=True)) if a != b]
    assert not changed, f"requests {changed} differ from the run without faults"


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def health(cluster: LocalCluster) -> int:
    with grpc.insecure_channel(cluster.address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_a_node_killed_mid_generation_loses_nothing(cluster: LocalCluster, reference: list[list[int]]) -> None:
    victim = stage_node(cluster, -1)
    epoch = status(cluster).epoch.value
    w = with_fault(cluster, "kill", lambda: cluster.signal_node(victim, signal.SIGKILL))
    assert_identical(w, reference)
    st = status(cluster)
    assert st.epoch.value > epoch and victim not in {n.info.name for n in st.nodes}
    change = st.placement_changes[-1]
    assert change.kind == "failure" and change.requests_replayed > 0 and change.resumed_at > change.detected_at
    assert health(cluster) == health_pb2.HealthCheckResponse.SERVING


def test_a_step_of_an_older_epoch_is_refused(cluster: LocalCluster) -> None:
    st = status(cluster)
    stream = StageStream(st.stages[0].address, secret=cluster.stage_key(st))
    try:
        msg = node_pb2.StepMessage(epoch=common_pb2.PlacementEpoch(value=st.epoch.value - 1), step_id=1)
        msg.sequences.add(request_id="stale", slot=0, start=0, token_ids=[1, 2, 3])
        result = stream.call(msg)
    finally:
        stream.close()
    assert f"serves epoch {st.epoch.value}, got a step of epoch {st.epoch.value - 1}" in result.error
    assert not result.tokens


def test_a_hung_node_is_replaced_and_rejoins_harmlessly(cluster: LocalCluster, reference: list[list[int]]) -> None:
    victim = stage_node(cluster, 0)
    w = with_fault(cluster, "hang", lambda: cluster.signal_node(victim, signal.SIGSTOP))
    assert_identical(w, reference)
    assert victim not in {n.info.name for n in status(cluster).nodes}
    cluster.signal_node(victim, signal.SIGCONT)  # it wakes up with its old stage and epoch
    wait_for(lambda: victim in {n.info.name for n in status(cluster).nodes}, what=f"{victim} to join again")
    assert_identical(workload(cluster, "woken").run(), reference)


def test_a_drained_node_moves_its_layers_without_disturbing_requests(cluster: LocalCluster,
                                                                     reference: list[list[int]]) -> None:
    victim = stage_node(cluster, -1)
    done: list[subprocess.CompletedProcess] = []
    token = ["--token-file", str(cluster.home / "join-token")]  # an operator's command: it presents the join token

    def drain() -> None:
        done.append(subprocess.run([sys.executable, "-m", "node.cli", "leave", cluster.address, victim, *token],
                                   cwd=REPO, capture_output=True, text=True, timeout=120))

    w = with_fault(cluster, "drain", drain)
    assert done[0].returncode == 0, done[0].stderr
    assert "drained" in done[0].stdout
    assert_identical(w, reference)
    assert status(cluster).placement_changes[-1].kind == "drain"
    cluster.expected_exits.add(victim)
    assert cluster.procs[victim].wait(timeout=30) == 0, "a drained node's daemon stops by itself"
    unknown = subprocess.run([sys.executable, "-m", "node.cli", "leave", cluster.address, "no-such-node", *token],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_nodes_rejoin_a_restarted_coordinator(cluster: LocalCluster, reference: list[list[int]]) -> None:
    left = len(status(cluster).nodes)
    cluster.signal_node("coordinator", signal.SIGKILL)
    cluster.procs["coordinator"].wait(timeout=10)
    cluster.start_coordinator(min_nodes=left)
    cluster.wait_ready(180)
    assert len(status(cluster).nodes) == left
    assert_identical(workload(cluster, "restart").run(), reference)


def test_with_no_capacity_requests_wait_until_a_node_joins(cluster: LocalCluster, reference: list[list[int]],
                                                           embedded_model_dir) -> None:  # noqa: ANN001
    for node in {n.info.name for n in status(cluster).nodes}:
        cluster.signal_node(node, signal.SIGKILL)
    wait_for(lambda: not status(cluster).stages, what="the placement to be dropped")
    st = status(cluster)
    assert st.unavailable_reason and health(cluster) == health_pb2.HealthCheckResponse.NOT_SERVING
    w = workload(cluster, "wait").start()
    time.sleep(1.0)
    assert status(cluster).requests_waiting == COUNT  # waiting, not failed
    cluster.start_node(NodeSpec(devices="cpu", model_dir=str(embedded_model_dir)), "node9")
    assert_identical(w.join(), reference)
    assert health(cluster) == health_pb2.HealthCheckResponse.SERVING


def test_a_node_that_joins_gets_layers_when_that_pays(cluster: LocalCluster, reference: list[list[int]],
                                                      embedded_model_dir) -> None:  # noqa: ANN001
    assert len(status(cluster).stages) == 1  # node9 alone (two stages do not fit one node)
    cluster.start_node(NodeSpec(devices="cpu", model_dir=str(embedded_model_dir)), "node10")
    for attempt in range(6):  # workloads back to back until the rebalance has happened during one
        assert_identical(workload(cluster, f"rebalance{attempt}").run(), reference)
        changes = [c for c in status(cluster).placement_changes if c.kind == "rebalance"]
        if changes and changes[-1].requests_replayed:
            break
    else:
        pytest.fail(f"no rebalance while requests ran: {status(cluster).placement_changes}")
    st = status(cluster)
    assert len(st.stages) == 2 and {m.node_id for s in st.stages for m in s.members} == {n.node_id for n in st.nodes}
