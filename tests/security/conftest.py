"""One cluster for the security tests: a random-init Llama as 2 stages on 2 CPU nodes, with client
authentication on and at most one Generate stream per client (so that the limit can be seen)."""

from __future__ import annotations

import pytest

from client.api import TensorfleetClient
from coordinator.local_cluster import LocalCluster, NodeSpec
from tensorfleet.v1 import coordinator_pb2

MAX_SEQ_LEN = 96


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):  # noqa: ANN201
    from tests.engine.reference import make_random_model

    work = tmp_path_factory.mktemp("security")
    model = make_random_model("llama-gqa-tied", work / "m")
    nodes = [NodeSpec(standby=False, devices="cpu", model_dir=str(model)) for _ in range(2)]
    with LocalCluster(work / "run", model=str(model), nodes=nodes, coordinator_args=[
            "--stages", "2", "--slots", "2", "--max-seq-len", str(MAX_SEQ_LEN), "--max-streams-per-client", "1"]) as c:
        yield c


@pytest.fixture(scope="session")
def status(cluster: LocalCluster) -> coordinator_pb2.StatusResponse:
    with TensorfleetClient(cluster.address, timeout=10) as client:
        return client.status()
