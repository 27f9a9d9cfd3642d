"""Credentials on every RPC of every service of a running cluster (node/security.py).

One cluster (a random-init Llama as 2 stages on 2 CPU nodes). Each RPC of the Coordinator, Node and
Stage services is called with no credentials, a made-up secret and a valid secret of the wrong kind:
each is refused with UNAUTHENTICATED or PERMISSION_DENIED, before its handler runs. The right secret
gets through. The health service stays open. A node with a wrong join token cannot join.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.api import TensorfleetClient
from coordinator.local_cluster import LocalCluster, free_port
from node.security import bearer, data_key
from tensorfleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def _call(stub_method, request, secret: str | None, *, streaming_response: bool = False,  # noqa: ANN001
          streaming_request: bool = False):  # noqa: ANN202
    req = iter([request]) if streaming_request else request
    out = stub_method(req, metadata=bearer(secret), timeout=10)
    return list(out) if streaming_response else out


def coordinator_calls(channel: grpc.Channel) -> dict:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    gen = coordinator_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[1, 2, 3]))
    gen.sampling.max_tokens = 2
    return {  # RPC -> (call(secret), the kind of secret it needs)
        "Generate": (lambda s: _call(stub.Generate, gen, s, streaming_response=True), "client"),
        "Status": (lambda s: _call(stub.Status, coordinator_pb2.StatusRequest(), s), "client"),
        "Join": (lambda s: _call(stub.Join, coordinator_pb2.JoinRequest(), s), "node"),
        "Heartbeat": (lambda s: _call(stub.Heartbeat, coordinator_pb2.HeartbeatRequest(node_id="nobody"), s), "node"),
        "Leave": (lambda s: _call(stub.Leave, coordinator_pb2.LeaveRequest(node="nobody"), s), "node"),
        "GetManifest": (lambda s: _call(stub.GetManifest, coordinator_pb2.ManifestRequest(), s), "node"),
        "FetchWeights": (lambda s: _call(stub.FetchWeights, coordinator_pb2.FetchWeightsRequest(names=["nope"]), s,
                                         streaming_response=True), "node"),
    }


COORDINATOR_RPCS = ["Generate", "Status", "Join", "Heartbeat", "Leave", "GetManifest", "FetchWeights"]


def test_the_test_covers_every_rpc() -> None:
    """A new RPC must be added here (and to its service's Guard, which refuses unknown methods)."""
    services = {s.name: [m.name for m in s.methods] for f in (coordinator_pb2, node_pb2)
                for s in f.DESCRIPTOR.services_by_name.values()}
    assert services == {"Coordinator": COORDINATOR_RPCS, "Node": ["LoadStage"], "Stage": ["Forward", "Probe", "Share"]}


def _secrets(cluster: LocalCluster) -> dict[str, str]:
    return {"client": cluster.api_key, "node": cluster.secrets.join_token}


@pytest.mark.parametrize("rpc", COORDINATOR_RPCS)
def test_coordinator_rpcs_refuse_missing_wrong_and_misplaced_credentials(cluster: LocalCluster, rpc: str) -> None:
    with grpc.insecure_channel(cluster.address) as channel:
        call, needs = coordinator_calls(channel)[rpc]
        other = _secrets(cluster)["node" if needs == "client" else "client"]
        unauthenticated, denied = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
        for secret, code in ((None, unauthenticated), ("tfkey-made-up", unauthenticated), (other, denied)):
            with pytest.raises(grpc.RpcError) as e:
                call(secret)
            assert e.value.code() == code, (rpc, secret, e.value.details())


@pytest.mark.parametrize("rpc", COORDINATOR_RPCS)
def test_coordinator_rpcs_let_the_right_credentials_through(cluster: LocalCluster, rpc: str) -> None:
    """Past the guard, each call is answered by its handler (an answer, or the handler's own error)."""
    with grpc.insecure_channel(cluster.address) as channel:
        call, needs = coordinator_calls(channel)[rpc]
        try:
            call(_secrets(cluster)[needs])
        except grpc.RpcError as e:
            assert e.code() not in REFUSED, (rpc, e.details())
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (rpc, e.details())


def test_node_service_needs_the_join_token(cluster: LocalCluster, status) -> None:  # noqa: ANN001
    for node in status.nodes:
        with grpc.insecure_channel(node.info.address) as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            for secret in (None, "tfjoin-made-up", cluster.api_key):
                with pytest.raises(grpc.RpcError) as e:
                    stub.LoadStage(node_pb2.LoadStageRequest(), metadata=bearer(secret), timeout=10)
                assert e.value.code() in REFUSED, (secret, e.value.details())
            with pytest.raises(grpc.RpcError) as e:  # the token gets through: an empty request is invalid
                stub.LoadStage(node_pb2.LoadStageRequest(), metadata=bearer(cluster.secrets.join_token), timeout=10)
            assert e.value.code() not in REFUSED, e.value.details()


def test_stage_service_needs_this_epochs_data_key(cluster: LocalCluster, status) -> None:  # noqa: ANN001
    key = cluster.stage_key(status)
    stale = data_key(cluster.secrets.join_token, status.coordinator_run, status.epoch.value - 1)
    other_run = data_key(cluster.secrets.join_token, "another-run", status.epoch.value)
    probe = node_pb2.ProbeRequest(payload=b"x" * 100)
    for stage in status.stages:
        with grpc.insecure_channel(stage.address) as channel:
            stub = node_pb2_grpc.StageStub(channel)
            step = node_pb2.StepMessage(epoch=status.epoch, step_id=1)
            for secret in (None, "tfdata-forged", stale, other_run, cluster.secrets.join_token, cluster.api_key):
                with pytest.raises(grpc.RpcError) as e:
                    stub.Probe(probe, metadata=bearer(secret), timeout=10)
                assert e.value.code() in REFUSED, (secret, e.value.details())
                with pytest.raises(grpc.RpcError) as e:
                    list(stub.Forward(iter([step]), metadata=bearer(secret), timeout=10))
                assert e.value.code() in REFUSED, (secret, e.value.details())
                with pytest.raises(grpc.RpcError) as e:
                    stub.Share(node_pb2.ShareRequest(epoch=status.epoch), metadata=bearer(secret), timeout=10)
                assert e.value.code() in REFUSED, (secret, e.value.details())
            assert stub.Probe(probe, metadata=bearer(key), timeout=10).received_bytes == 100
            # Past the guard, an offer from no machine is answered with a refusal, not an error.
            share = stub.Share(node_pb2.ShareRequest(epoch=status.epoch), metadata=bearer(key), timeout=10)
            assert not share.accepted and "another machine" in share.reason


def test_health_stays_open_everywhere(cluster: LocalCluster, status) -> None:  # noqa: ANN001
    for address in [cluster.address, *(n.info.address for n in status.nodes)]:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_cluster_serves_clients_with_the_key(cluster: LocalCluster) -> None:
    with TensorfleetClient(cluster.address, timeout=60, api_key=cluster.api_key) as client:
        assert len(client.generate([1, 2, 3], max_tokens=3, ignore_eos=True).token_ids) == 3


def _join(cluster: LocalCluster, token_file: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "proto")]),
           "TENSORFLEET_HOME": str(token_file.parent / "empty-home")}
    env.pop("TENSORFLEET_JOIN_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "node.cli", "join", cluster.address, "--no-probe", "--devices", "cpu",
                           "--token-file", str(token_file)], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)


def test_a_node_with_a_wrong_token_cannot_join(cluster: LocalCluster, status, tmp_path: Path) -> None:  # noqa: ANN001
    wrong = tmp_path / "wrong-token"
    wrong.write_text("tfjoin-not-the-token\n")
    wrong.chmod(0o600)
    out = _join(cluster, wrong)
    assert out.returncode == 2 and "UNAUTHENTICATED" in out.stderr, out.stderr[-2000:]
    with TensorfleetClient(cluster.address, timeout=10) as client:
        assert len(client.status().nodes) == len(status.nodes)


def test_a_token_file_others_can_read_is_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    loose = tmp_path / "token"
    loose.write_text(cluster.secrets.join_token + "\n")
    loose.chmod(0o644)
    out = _join(cluster, loose)
    assert out.returncode == 2 and "chmod 600" in out.stderr, out.stderr[-2000:]


def test_the_cli_reports_a_wrong_api_key(cluster: LocalCluster) -> None:
    out = subprocess.run([sys.executable, "-m", "client.cli", "status", "--coordinator", cluster.address,
                          "--api-key", "tfkey-wrong"], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "proto")])})
    assert out.returncode == 2 and "UNAUTHENTICATED" in out.stderr, out.stderr


def test_no_auth_opens_the_client_rpcs_only(tmp_path: Path) -> None:
    """`coordinator start --no-auth`: Status needs no key, Join still needs the join token; the secrets are
    created 0600 and printed once."""
    from tests.engine.reference import make_random_model

    model = make_random_model("llama-gqa-tied", tmp_path / "m")
    port = free_port()
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "start", "--model", str(model), "--port",
                             str(port), "--no-auth", "--no-http", "--state-dir", str(home)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "proto")])})
    try:
        printed = []
        for line in proc.stdout:
            printed.append(line)
            if "authentication is off" in line:
                break
        token = (home / "join-token").read_text().strip()
        assert any(token in line for line in printed)
        for name in ("join-token", "api-keys"):
            assert (home / name).stat().st_mode & 0o777 == 0o600
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            assert stub.Status(coordinator_pb2.StatusRequest(), timeout=10).model
            with pytest.raises(grpc.RpcError) as e:
                stub.Heartbeat(coordinator_pb2.HeartbeatRequest(node_id="x"), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.terminate()
        proc.wait(timeout=30)
