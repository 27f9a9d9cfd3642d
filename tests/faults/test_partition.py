"""Tier 4: a node cut off from the network mid-generation, and back again.

Each of 3 nodes runs in its own network namespace, joined to the host by a veth pair (tests/faults/netns.py);
the coordinator listens on the bridge. Bringing a node's link down leaves its sockets open and silent,
like a pulled cable: the heartbeat timeout must notice it, its layers move to the spare, and the 16 streaming
requests complete with the tokens of the undisturbed run. When the link returns, the node still runs its
old stage under the old epoch: it must rejoin as a new member and change nothing.
"""

from __future__ import annotations

import os
import time

import pytest

from client.api import TensorfleetClient
from client.workload import StreamingWorkload
from coordinator.local_cluster import LocalCluster
from tests.faults.netns import Fabric, netns_unavailable

reason = netns_unavailable()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"network namespaces: {reason}")

PROMPTS = ["Write a haiku about the sea.", "Name a famous painter.", "What is 12 times 12?"]
COUNT, TOKENS = 16, 16


def run(cluster: LocalCluster, tag: str) -> StreamingWorkload:
    return StreamingWorkload(cluster.address, PROMPTS, count=COUNT, max_tokens=TOKENS, seeded=range(0, 16, 2),
                             tag=tag, timeout=240)


def names(cluster: LocalCluster) -> dict[str, str]:
    with TensorfleetClient(cluster.address, timeout=10) as client:
        st = client.status()
    return {n.node_id: n.info.name for n in st.nodes} | {"last": st.stages[-1].members[0].node_id}


def test_a_partitioned_node_is_replaced_and_cannot_corrupt_anything(tmp_path, embedded_model_dir) -> None:  # noqa: ANN001
    pid = os.getpid()
    with Fabric(3, prefix=f"tfp{pid % 1000}", subnet=f"10.78.{pid % 250}") as fabric:
        nodes = fabric.node_specs(devices="cpu", model_dir=str(embedded_model_dir))
        cluster = LocalCluster(tmp_path, model=str(embedded_model_dir), nodes=nodes, host=fabric.host_address,
                               coordinator_args=["--stages", "2", "--slots", str(COUNT), "--max-seq-len", "256",
                                                 "--heartbeat-ms", "200", "--heartbeat-timeout-ms", "1000"])
        with cluster:
            reference = run(cluster, "ref").run()
            assert not reference.lost()
            known = names(cluster)
            victim = int(known[known["last"]].removeprefix("node"))
            w = run(cluster, "cut").start()
            assert w.wait_tokens(COUNT * TOKENS // 3)
            fabric.cut(victim)
            w.join()
            assert not w.lost(), [r.error for r in w.lost()]
            assert w.outputs() == reference.outputs()
            assert f"node{victim}" not in names(cluster).values()
            fabric.restore(victim)
            deadline = time.monotonic() + 60
            while f"node{victim}" not in names(cluster).values():
                assert time.monotonic() < deadline, "the node did not join again after its link returned"
                time.sleep(0.25)
            again = run(cluster, "after").run()
            assert not again.lost() and again.outputs() == reference.outputs()
            assert "dropping the stage and joining again" in cluster.log(f"node{victim}")
