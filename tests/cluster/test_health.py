"""Tier 3: readiness as probes see it. The coordinator's HTTP /health and gRPC health say NOT_SERVING
until a node has joined and the placement is complete, SERVING then, and NOT_SERVING again once the
only node is killed; /metrics says the same (tensorfleet_serving). Server reflection lists the services
of the coordinator and of a node without credentials (what grpcurl needs)."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.local_cluster import LocalCluster, NodeSpec


def http_health(cluster: LocalCluster) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(cluster.http_url + "/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def grpc_health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def services(address: str) -> set[str]:
    """The services a server lists through reflection (no credentials presented)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        return {s.name for reply in replies for s in reply.list_services_response.service}


def wait_for(predicate, timeout_s: float = 30.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_health_follows_the_placement(tmp_path: Path) -> None:
    from tests.engine.reference import make_random_model

    model = make_random_model("llama-gqa-tied", tmp_path / "m")
    spec = NodeSpec(standby=False, devices="cpu", model_dir=str(model))
    cluster = LocalCluster(tmp_path / "run", model=str(model), nodes=[spec],
                           coordinator_args=["--heartbeat-timeout-ms", "1000", "--capacity-wait", "5"])
    try:
        cluster.start_coordinator(min_nodes=1)
        assert wait_for(lambda: _answers(cluster)), cluster.log("coordinator")
        status, body = http_health(cluster)
        assert status == 503 and "waiting for 1 node" in body["reason"]
        assert grpc_health(cluster.address) == "NOT_SERVING"
        assert cluster.metrics()["tensorfleet_serving{}"] == 0
        assert {"tensorfleet.v1.Coordinator", "grpc.health.v1.Health"} <= services(cluster.address)

        cluster.start_node(spec, "node0")
        cluster.wait_ready(120)
        assert http_health(cluster) == (200, {"status": "serving", "epoch": 1})
        assert grpc_health(cluster.address) == "SERVING"
        assert cluster.metrics()["tensorfleet_serving{}"] == 1
        node_address = next(line.split("serving control on ")[1].split()[0]
                            for line in cluster.log("node0").splitlines() if "serving control on" in line)
        assert "tensorfleet.v1.Node" in services(node_address)

        cluster.signal_node("node0", signal.SIGKILL)
        assert wait_for(lambda: http_health(cluster)[0] == 503), cluster.log("coordinator")[-2000:]
        assert grpc_health(cluster.address) == "NOT_SERVING"
        assert "node0" in http_health(cluster)[1]["reason"] or "no node" in http_health(cluster)[1]["reason"]
    finally:
        cluster.stop()


def _answers(cluster: LocalCluster) -> bool:
    try:
        http_health(cluster)
        return True
    except OSError:
        return False
