"""TLS certificates (node/certs.py): the files and what they contain, the checks of TLSFiles.from_dir,
real gRPC handshakes over loopback (mutual TLS accepted and refused), and `tensorfleet certs create`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from client.cli import main as cli_main
from engine.errors import ConfigError
from node.certs import TLSFiles, channel_credentials, create_ca, create_cluster_certs, issue, server_credentials

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ["10.0.0.5", "node1.example", "fd00::7"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a CA and the shared certificate, shared by the tests that only read it."""
    directory = tmp_path_factory.mktemp("certs")
    create_cluster_certs(directory, HOSTS)
    return directory


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another cluster's CA and certificate: same names, different keys."""
    directory = tmp_path_factory.mktemp("other")
    create_cluster_certs(directory, ["127.0.0.1"])
    return directory


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ----------------------------------------------------------------------------------- files
def test_cluster_certs_are_written_with_private_keys(tmp_path: Path) -> None:
    written = create_cluster_certs(tmp_path / "new", ["10.0.0.5"])
    assert [p.name for p in written] == ["ca.pem", "ca-key.pem", "cluster.pem", "cluster-key.pem"]
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.name.endswith("-key.pem"):
            assert mode == 0o600, path
        else:
            assert not mode & (stat.S_IWGRP | stat.S_IWOTH), path
    assert not list((tmp_path / "new").glob(".*"))  # no temporary files left behind


def test_certificate_chain_hosts_and_usages(cluster: Path) -> None:
    ca, cert = _cert(cluster / "ca.pem"), _cert(cluster / "cluster.pem")
    cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert ips == {"10.0.0.5", "fd00::7", "127.0.0.1", "::1"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"node1.example", "localhost"}
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_existing_files_are_not_overwritten(tmp_path: Path) -> None:
    create_cluster_certs(tmp_path, ["10.0.0.5"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_cluster_certs(tmp_path, ["10.0.0.6"])
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_ca(tmp_path)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        issue(tmp_path, "cluster", hosts=["10.0.0.6"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    create_cluster_certs(tmp_path, ["10.0.0.6"], overwrite=True)
    assert (tmp_path / "ca.pem").read_bytes() != before["ca.pem"]
    TLSFiles.from_dir(tmp_path)  # the new pair belongs together


@pytest.mark.parametrize("host", ["10.0.0.5:50051", "https://node1", "", "node 1", "10.0.0.256", "-x.example"])
def test_bad_hosts_are_refused_before_writing(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        create_cluster_certs(tmp_path, [host])
    assert not (tmp_path / "ca.pem").exists()


# ----------------------------------------------------------------------------------- TLSFiles checks
def test_from_dir_accepts_a_good_directory(cluster: Path) -> None:
    tls = TLSFiles.from_dir(cluster)
    assert (tls.ca, tls.cert, tls.key) == (cluster / "ca.pem", cluster / "cluster.pem", cluster / "cluster-key.pem")


@pytest.mark.parametrize("missing", ["ca.pem", "cluster.pem", "cluster-key.pem"])
def test_from_dir_names_a_missing_file(tmp_path: Path, missing: str) -> None:
    create_cluster_certs(tmp_path, ["10.0.0.5"])
    (tmp_path / missing).unlink()
    with pytest.raises(ConfigError, match=f"{missing} does not exist.*tensorfleet certs create"):
        TLSFiles.from_dir(tmp_path)


def test_from_dir_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist or is not a directory"):
        TLSFiles.from_dir(tmp_path / "nowhere")


def test_from_dir_refuses_a_certificate_of_another_ca(tmp_path: Path, other_ca: Path) -> None:
    create_cluster_certs(tmp_path, ["10.0.0.5"])
    (tmp_path / "ca.pem").write_bytes((other_ca / "ca.pem").read_bytes())
    with pytest.raises(ConfigError, match="was not issued by the CA"):
        TLSFiles.from_dir(tmp_path)


def test_from_dir_refuses_a_key_of_another_certificate(tmp_path: Path, other_ca: Path) -> None:
    create_cluster_certs(tmp_path, ["10.0.0.5"])
    (tmp_path / "cluster-key.pem").write_bytes((other_ca / "cluster-key.pem").read_bytes())
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        TLSFiles.from_dir(tmp_path)


def test_from_dir_refuses_an_expired_certificate(tmp_path: Path) -> None:
    create_ca(tmp_path)
    ten_days_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    issue(tmp_path, "old", hosts=["10.0.0.5"], days=1, not_before=ten_days_ago)
    with pytest.raises(ConfigError, match="old.pem expired on .*--overwrite"):
        TLSFiles.from_dir(tmp_path, name="old")


def test_from_dir_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    create_cluster_certs(tmp_path, ["10.0.0.5"])
    (tmp_path / "cluster-key.pem").chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by others.*chmod 600"):
        TLSFiles.from_dir(tmp_path)


def test_from_dir_refuses_garbage(tmp_path: Path) -> None:
    create_cluster_certs(tmp_path, ["10.0.0.5"])
    (tmp_path / "cluster.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="cluster.pem is not a PEM certificate"):
        TLSFiles.from_dir(tmp_path)


def test_issue_refuses_a_certificate_outlasting_the_ca_and_bad_names(tmp_path: Path) -> None:
    create_ca(tmp_path, days=30)
    with pytest.raises(ConfigError, match="outlast the CA"):
        issue(tmp_path, "node1", hosts=["10.0.0.5"], days=31)
    with pytest.raises(ConfigError, match="not a plain file name"):
        issue(tmp_path, "../evil", hosts=["10.0.0.5"])
    with pytest.raises(ConfigError, match="at least 1 day"):
        issue(tmp_path, "node1", hosts=["10.0.0.5"], days=0)


# ----------------------------------------------------------------------------------- real gRPC
@contextmanager
def _health_server(credentials: grpc.ServerCredentials) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port, "the TLS server could not bind"
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def _check(port: int, credentials: grpc.ChannelCredentials | None, host: str = "127.0.0.1") -> None:
    target = f"{host}:{port}"
    with grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def _refused(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        _check(port, credentials)
    return failure.value.code()


def test_mutual_tls_accepts_a_client_certificate_and_refuses_others(cluster: Path, other_ca: Path) -> None:
    tls, other = TLSFiles.from_dir(cluster), TLSFiles.from_dir(other_ca)
    with _health_server(server_credentials(tls, require_client_cert=True)) as port:
        _check(port, channel_credentials(tls, client_cert=True))
        _check(port, channel_credentials(tls, client_cert=True), host="localhost")
        assert _refused(port, channel_credentials(tls, client_cert=False)) == grpc.StatusCode.UNAVAILABLE
        assert _refused(port, channel_credentials(tls.ca, client_cert=False)) == grpc.StatusCode.UNAVAILABLE
        assert _refused(port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
        # Trusting another CA: the client refuses the server; presenting another CA's certificate:
        # the server refuses the client.
        assert _refused(port, channel_credentials(other, client_cert=True)) == grpc.StatusCode.UNAVAILABLE
        foreign_client = grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes(),
                                                      private_key=other.key.read_bytes(),
                                                      certificate_chain=other.cert.read_bytes())
        assert _refused(port, foreign_client) == grpc.StatusCode.UNAVAILABLE
        # A name the certificate does not hold: the client refuses the server.
        options = [("grpc.ssl_target_name_override", "elsewhere.example")]
        with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(tls, client_cert=True), options) as channel:
            with pytest.raises(grpc.RpcError) as failure:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_certificates_accepts_a_ca_only_client(cluster: Path, other_ca: Path) -> None:
    tls = TLSFiles.from_dir(cluster)
    with _health_server(server_credentials(tls, require_client_cert=False)) as port:
        _check(port, channel_credentials(cluster / "ca.pem", client_cert=False))
        _check(port, channel_credentials(str(cluster / "ca.pem"), client_cert=False))
        untrusting = channel_credentials(other_ca / "ca.pem", client_cert=False)
        assert _refused(port, untrusting) == grpc.StatusCode.UNAVAILABLE


def test_channel_credentials_needs_tls_files_for_a_client_certificate(cluster: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs TLSFiles"):
        channel_credentials(cluster / "ca.pem", client_cert=True)
    with pytest.raises(ConfigError, match="not a CA certificate"):
        channel_credentials(cluster / "cluster.pem", client_cert=False)
    with pytest.raises(ConfigError, match="does not exist"):
        channel_credentials(tmp_path / "ca.pem", client_cert=False)


# ----------------------------------------------------------------------------------- CLI
def test_cli_creates_certificates(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    result = subprocess.run([sys.executable, "-m", "client.cli", "certs", "create", str(directory),
                             "--hosts", "10.0.0.5,node1.example"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto")])})
    assert result.returncode == 0, result.stderr
    for name in ("ca.pem", "ca-key.pem", "cluster.pem", "cluster-key.pem"):
        assert str(directory / name) in result.stdout
    assert f"--tls {directory}" in result.stdout and f"--tls-ca {directory}/ca.pem" in result.stdout
    sans = _cert(directory / "cluster.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.5") in sans.get_values_for_type(x509.IPAddress)
    assert "node1.example" in sans.get_values_for_type(x509.DNSName)
    TLSFiles.from_dir(directory)


@pytest.mark.parametrize("hosts, complaint", [
    ("10.0.0.5,,node1", "comma-separated list of hosts"),
    (",", "comma-separated list of hosts"),
    ("10.0.0.5:50051", "'10.0.0.5:50051' is neither an IP address nor a DNS name"),
])
def test_cli_refuses_a_bad_host_list(tmp_path: Path, capsys: pytest.CaptureFixture[str], hosts: str,
                                     complaint: str) -> None:
    assert cli_main(["certs", "create", str(tmp_path / "certs"), "--hosts", hosts]) == 2
    err = capsys.readouterr().err
    assert complaint in err and err.count("\n") == 1
    assert not (tmp_path / "certs" / "ca.pem").exists()


def test_cli_refuses_existing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["certs", "create", str(tmp_path), "--hosts", "10.0.0.5"]) == 0
    capsys.readouterr()
    assert cli_main(["certs", "create", str(tmp_path), "--hosts", "10.0.0.5"]) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err and err.count("\n") == 1
    assert cli_main(["certs", "create", str(tmp_path), "--hosts", "10.0.0.5", "--overwrite"]) == 0
    assert cli_main(["certs", "create", str(tmp_path / "x"), "--hosts", "10.0.0.5", "--days", "0"]) == 2
    assert "at least 1 day" in capsys.readouterr().err
