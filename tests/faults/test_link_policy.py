"""The auto codec policy on a real, bandwidth-limited link: stage 0's node measures its link to stage 1
(both nodes in network namespaces, their links limited with tc tbf), decides to compress prefill-sized
messages, and the cluster serves with it."""

from __future__ import annotations

import os
import re

import pytest

from client.api import TensorfleetClient
from coordinator.local_cluster import LocalCluster
from tests.faults.netns import Fabric, netns_unavailable

reason = netns_unavailable()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"network namespaces: {reason}")

RATE_MBIT = 20


def test_auto_measures_a_slow_link_and_compresses_prefills(tmp_path, embedded_model_dir) -> None:  # noqa: ANN001
    pid = os.getpid()
    with Fabric(2, prefix=f"tfc{pid % 1000}", subnet=f"10.76.{pid % 250}") as fabric:
        nodes = fabric.node_specs(devices="cpu", model_dir=str(embedded_model_dir))
        cluster = LocalCluster(tmp_path, model=str(embedded_model_dir), nodes=nodes, host=fabric.host_address,
                               coordinator_args=["--stages", "2", "--slots", "2", "--max-seq-len", "512",
                                                 "--codec", "auto", "--codec-min-tokens", "16"])
        with cluster:
            for i in range(2):
                fabric.limit(i, f"{RATE_MBIT}mbit")
            with TensorfleetClient(cluster.address, timeout=120) as client:
                first = client.generate("Say hello.", max_tokens=4, ignore_eos=True)  # connects: the probe starts
                decisions = []
                for _ in range(100):
                    logs = "".join(cluster.log(f"node{i}") for i in range(2))
                    decisions = re.findall(r"link ([\d.]+) Mbit/s.*compress (from (\d+) tokens|never)", logs)
                    if decisions:
                        break
                    client.generate("Say hello.", max_tokens=1)  # the probe runs beside the steps
                assert decisions, logs[-3000:]
                mbit, what, n_star = decisions[0]
                # Two tbf hops of 20 Mbit/s in series: the probe must see about 20 (TCP and gRPC overhead).
                assert 0.6 * RATE_MBIT < float(mbit) < 1.1 * RATE_MBIT
                assert what.startswith("from") and 16 <= int(n_star) <= 64, decisions
                long = client.generate("Tell me about the sea. " * 30, max_tokens=8, ignore_eos=True)
    assert len(first.token_ids) == 4 and len(long.token_ids) == 8
