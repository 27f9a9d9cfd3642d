"""A cluster with TLS on every channel (`--tls DIR` on the coordinator and the nodes; node/certs.py):
clients that trust the CA are served; plaintext clients reach nothing; the nodes' servers (control and
data plane) also refuse TLS clients without the cluster's certificate (mutual TLS)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.api import ClientError, TensorfleetClient
from coordinator.local_cluster import LocalCluster, NodeSpec
from node.certs import create_cluster_certs
from node.security import bearer, open_channel
from tensorfleet.v1 import node_pb2, node_pb2_grpc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):  # noqa: ANN201
    from tests.engine.reference import make_random_model

    work = tmp_path_factory.mktemp("tls")
    certs = work / "certs"
    create_cluster_certs(certs, ["127.0.0.1"])
    model = make_random_model("llama-gqa-tied", work / "m")
    nodes = [NodeSpec(standby=False, devices="cpu", model_dir=str(model)) for _ in range(2)]
    with LocalCluster(work / "run", model=str(model), nodes=nodes, tls_dir=certs,
                      coordinator_args=["--stages", "2", "--slots", "2", "--max-seq-len", "64"]) as c:
        yield c


def _check(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_a_client_that_trusts_the_ca_is_served_across_tls_stages(cluster: LocalCluster) -> None:
    with TensorfleetClient(cluster.address, timeout=60, tls_ca=str(Path(cluster.tls_dir) / "ca.pem")) as client:
        st = client.status()
        assert len(st.stages) == 2
        assert len(client.generate([5, 6, 7], max_tokens=4, ignore_eos=True).token_ids) == 4


def test_a_plaintext_client_cannot_talk_to_the_coordinator(cluster: LocalCluster) -> None:
    with TensorfleetClient(cluster.address, timeout=5, tls_ca="") as client, pytest.raises(ClientError) as e:
        client.status()
    assert e.value.code == "UNAVAILABLE"


def test_node_servers_need_the_cluster_certificate(cluster: LocalCluster) -> None:
    ca = (Path(cluster.tls_dir) / "ca.pem").read_bytes()
    with TensorfleetClient(cluster.address, timeout=10) as client:
        st = client.status()
    addresses = [n.info.address for n in st.nodes] + [s.address for s in st.stages]
    for address in addresses:
        for channel in (grpc.insecure_channel(address),
                        grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))):
            with channel, pytest.raises(grpc.RpcError) as e:
                _check(channel)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (address, e.value.details())
    for node in st.nodes:  # with the certificate: served
        with open_channel(node.info.address, cluster.tls_dir) as channel:
            assert _check(channel) == health_pb2.HealthCheckResponse.SERVING
    for stage in st.stages:
        with open_channel(stage.address, cluster.tls_dir) as channel:
            probe = node_pb2.ProbeRequest(payload=b"x" * 10)
            reply = node_pb2_grpc.StageStub(channel).Probe(probe, metadata=bearer(cluster.stage_key(st)), timeout=10)
            assert reply.received_bytes == 10
    with grpc.insecure_channel(cluster.address) as channel, pytest.raises(grpc.RpcError):
        _check(channel)


def test_the_http_api_serves_https_only(cluster: LocalCluster) -> None:
    """With --tls the HTTP API is HTTPS with the cluster's certificate: a client that trusts the CA is
    served, a plaintext HTTP request is not (no answer, or an error)."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    assert cluster.http_url.startswith("https://")
    trusting = ssl.create_default_context(cafile=str(Path(cluster.tls_dir) / "ca.pem"))
    request = urllib.request.Request(cluster.http_url + "/v1/models",
                                     headers={"authorization": f"Bearer {cluster.api_key}"})
    with urllib.request.urlopen(request, timeout=10, context=trusting) as r:
        assert json.loads(r.read())["data"][0]["object"] == "model"
    with pytest.raises(urllib.error.URLError):  # the certificate is not trusted by default
        urllib.request.urlopen(request, timeout=10)
    plain = "http://" + cluster.http_url.removeprefix("https://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(plain + "/health", timeout=10)
