"""TLS certificates of a cluster: a private CA, the certificates it issues, and gRPC credentials.

Every channel is TLS: client -> coordinator, coordinator <-> node (control), node -> node (data plane).
Node servers require a client certificate (mutual TLS), so only holders of a certificate of the
cluster's CA can call them; clients of the coordinator need only the CA certificate to check it.

The simplest setup is one shared certificate (``tensorfleet certs create DIR --hosts ...``)::

    DIR/ca.pem            the CA certificate: copy it to every machine and every client
    DIR/ca-key.pem        the CA's key (0600): needed only to issue more certificates; keep it off workers
    DIR/cluster.pem       one certificate for the coordinator and all nodes, as server and as client,
    DIR/cluster-key.pem   and its key (0600); copy both, with ca.pem, to each machine of the cluster

A shared certificate proves "a member of this cluster", not which member: anyone holding
``cluster-key.pem`` can act as any node or the coordinator (the join token and data keys of
node/security.py still apply on top). For per-machine identities, ``issue`` one certificate per machine
from the same CA and point each at its own name (``TLSFiles.from_dir(DIR, name="node1")``).

Keys are ECDSA P-256: every TLS stack accepts them, grpc's BoringSSL included (Ed25519 does not work:
grpcio 1.85's handshake fails with NO_COMMON_SIGNATURE_ALGORITHMS). A certificate names its
hosts in SubjectAlternativeNames (IP addresses as IPAddress, the rest as DNS names; localhost, 127.0.0.1
and ::1 are always added): a channel must connect by one of these names, or the handshake fails.
Certificates are not revoked (no CRL or OCSP): to retire one, create a new CA and certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine.errors import ConfigError

log = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
CLUSTER_NAME = "cluster"
ALWAYS_HOSTS = ("localhost", "127.0.0.1", "::1")
# Started a little in the past: machines' clocks differ, and a certificate "not yet valid" on a
# machine whose clock is behind fails every handshake.
CLOCK_SKEW = dt.timedelta(minutes=5)
EXPIRY_WARNING = dt.timedelta(days=30)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_FIX = "create them with `tensorfleet certs create DIR --hosts HOST[,HOST...]`"


# ----------------------------------------------------------------------------------- creating
def create_ca(directory: str | os.PathLike, *, name: str = "tensorfleet CA", days: int = 3650,
              overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new CA to ``directory``: ``ca.pem`` and ``ca-key.pem`` (0600); returns their paths.

    Refuses to replace existing files unless ``overwrite``; a new CA invalidates every certificate of
    the old one."""
    directory = Path(directory)
    _check_days(days)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    _refuse_existing((cert_path, key_path), overwrite)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tensorfleet"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = _now() - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(cert_path, cert, key_path, key)
    return cert_path, key_path


def issue(directory: str | os.PathLike, name: str, *, hosts: Iterable[str], days: int = 825,
          overwrite: bool = False, not_before: dt.datetime | None = None) -> tuple[Path, Path]:
    """Sign with the CA in ``directory`` a certificate for server and client use (both extended key
    usages) valid for ``hosts`` plus localhost; write ``<name>.pem`` and ``<name>-key.pem`` (0600) and
    return their paths.

    ``not_before`` (default: now less a few minutes of clock skew) exists for tests of expired
    certificates. Refuses existing files unless ``overwrite``, and a validity that outlasts the CA."""
    directory = Path(directory)
    if not _NAME.fullmatch(name) or name.endswith(".pem") or name in ("ca", "ca-key"):
        raise ConfigError(f"certificate name {name!r} is not a plain file name (letters, digits, . _ -) "
                          f"or is reserved (ca)")
    _check_days(days)
    alt_names = _alt_names(hosts)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    _refuse_existing((cert_path, key_path), overwrite)
    ca_cert, ca_key = _load_ca(directory)
    start = not_before if not_before is not None else _now() - CLOCK_SKEW
    end = start + dt.timedelta(days=days)
    if end > ca_cert.not_valid_after_utc:
        raise ConfigError(f"a certificate valid for {days} days would outlast the CA in {directory / CA_CERT} "
                          f"(valid until {ca_cert.not_valid_after_utc:%Y-%m-%d}): use fewer --days or a new CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tensorfleet"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, f"tensorfleet {name}")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(cert_path, cert, key_path, key)
    return cert_path, key_path


def create_cluster_certs(directory: str | os.PathLike, hosts: Iterable[str], *, days: int = 825,
                         overwrite: bool = False) -> list[Path]:
    """A new CA and one shared certificate ``cluster`` (server and client, for ``hosts``) in
    ``directory``; returns the files written: ca.pem, ca-key.pem, cluster.pem, cluster-key.pem.

    All four names are checked before anything is written, so a refusal leaves the directory as it
    was. The CA lives at least as long as the certificate (10 years by default)."""
    directory = Path(directory)
    hosts = list(hosts)
    _check_days(days)
    _alt_names(hosts)  # a bad host fails before the CA is written
    _refuse_existing([directory / n for n in (CA_CERT, CA_KEY, f"{CLUSTER_NAME}.pem", f"{CLUSTER_NAME}-key.pem")],
                     overwrite)
    written = list(create_ca(directory, days=max(3650, days + 1), overwrite=overwrite))
    written += issue(directory, CLUSTER_NAME, hosts=hosts, days=days, overwrite=overwrite)
    return written


def _alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """SubjectAlternativeNames for ``hosts`` plus ALWAYS_HOSTS, without duplicates; ConfigError names a
    host that is neither an IP address nor a DNS name (a port or a scheme, for instance)."""
    if isinstance(hosts, str):
        raise ConfigError(f"hosts must be a list of names, not the string {hosts!r}")
    names: dict[str, x509.GeneralName] = {}
    for raw in [*hosts, *ALWAYS_HOSTS]:
        host = raw.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # [::1], as in addresses
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            dns = host.lower().rstrip(".")
            labels = dns.split(".")
            if labels[0] == "*" and len(labels) > 2:
                labels = labels[1:]  # a wildcard is allowed as the whole leftmost label only
            # An all-digit last label is a mistyped IP address (e.g. 10.0.0.256), never a real name.
            if (len(dns) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels)
                    or labels[-1].isdigit()):
                raise ConfigError(f"host {raw!r} is neither an IP address nor a DNS name (give bare hosts: "
                                  f"no port, scheme or spaces; e.g. 10.0.0.5 or node1.example)") from None
            names.setdefault(dns, x509.DNSName(dns))
        else:
            names.setdefault(str(ip), x509.IPAddress(ip))
    return list(names.values())


def _check_days(days: int) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise ConfigError(f"days={days!r}: a certificate must be valid for at least 1 day")


def _refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist(s): refusing to overwrite "
                          f"(pass --overwrite / overwrite=True to replace them)")


def _write_pair(cert_path: Path, cert: x509.Certificate, key_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_file(key_path, key_pem, 0o600)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write through a new temporary file, created with ``mode`` (a key is never readable by others,
    not even for a moment), then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class TLSFiles:
    """The files a server or a client-authenticated channel needs: the CA certificate, a certificate
    issued by it, and that certificate's private key (PEM). ``from_dir`` finds and checks them."""

    ca: Path
    cert: Path
    key: Path

    def __post_init__(self) -> None:
        for field in ("ca", "cert", "key"):
            object.__setattr__(self, field, Path(getattr(self, field)))

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, name: str = CLUSTER_NAME) -> TLSFiles:
        """``ca.pem``, ``<name>.pem`` and ``<name>-key.pem`` of ``directory``, validated (``validate``)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(f"TLS directory {directory} does not exist or is not a directory: {_FIX}")
        tls = cls(ca=directory / CA_CERT, cert=directory / f"{name}.pem", key=directory / f"{name}-key.pem")
        tls.validate()
        return tls

    def validate(self) -> None:
        """Raise ConfigError unless the files exist and parse, the key is private (no group or other
        permissions) and matches the certificate, and the certificate was issued by the CA and is
        valid now (the CA too). Logs a warning when either expires within 30 days."""
        self.read()

    def read(self) -> tuple[bytes, bytes, bytes]:
        """The PEM bytes of (ca, cert, key), read once and validated as in ``validate``: what is checked
        is what is used."""
        ca_pem, cert_pem = _read(self.ca, "CA certificate"), _read(self.cert, "certificate")
        key_pem = _read_private(self.key)
        ca, cert, key = _parse_cert(ca_pem, self.ca), _parse_cert(cert_pem, self.cert), _parse_key(key_pem, self.key)
        _check_ca(ca, self.ca)
        if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
            raise ConfigError(f"the key {self.key} does not belong to the certificate {self.cert}: "
                              f"copy the matching pair (they are created together)")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise ConfigError(f"the certificate {self.cert} was not issued by the CA {self.ca}: copy the ca.pem "
                              f"created with it, or issue a new certificate from this CA") from None
        _check_dates(ca, self.ca)
        _check_dates(cert, self.cert)
        _check_usages(cert, self.cert)
        return ca_pem, cert_pem, key_pem


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"the {what} {path} does not exist: {_FIX}") from None
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}") from None


def _read_private(path: Path) -> bytes:
    """A key file's bytes; refuses one that its group or others may access (as ssh does)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"the private key {path} does not exist: {_FIX}") from None
    except OSError as e:
        raise ConfigError(f"cannot read the private key {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the private key {path} is accessible by others (mode {stat.S_IMODE(mode):o}): "
                          f"chmod 600 {path}")
    return _read(path, "private key")


def _parse_cert(pem: bytes, path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def _parse_key(pem: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(f"the private key {path} is encrypted: gRPC needs it unencrypted (chmod 600 protects "
                          f"it instead)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not a PEM private key (-----BEGIN PRIVATE KEY-----)") from None
    return key


def _public_bytes(key) -> bytes:  # noqa: ANN001 - any public key type
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_ca(ca: x509.Certificate, path: Path) -> None:
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{path} is not a CA certificate (no BasicConstraints CA:TRUE): give the cluster's ca.pem")


def _check_dates(cert: x509.Certificate, path: Path) -> None:
    now = _now()
    if now < cert.not_valid_before_utc:
        raise ConfigError(f"the certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                          f"UTC: is this machine's clock right?")
    if now >= cert.not_valid_after_utc:
        raise ConfigError(f"the certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
                          f"create new ones (tensorfleet certs create DIR --hosts ... --overwrite)")
    if cert.not_valid_after_utc - now < EXPIRY_WARNING:
        log.warning("the certificate %s expires on %s UTC: renew it soon", path,
                    f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}")


def _check_usages(cert: x509.Certificate, path: Path) -> None:
    """Both usages are needed, since one certificate serves and calls; a certificate without the
    extension is unrestricted."""
    try:
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return
    missing = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}
    lacking = [label for oid, label in missing.items() if oid not in usages]
    if lacking:
        raise ConfigError(f"the certificate {path} lacks the extended key usage {', '.join(lacking)}: "
                          f"issue one with `tensorfleet certs create` (it has both)")


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    ca = _parse_cert(_read(cert_path, "CA certificate"), cert_path)
    key = _parse_key(_read_private(key_path), key_path)
    _check_ca(ca, cert_path)
    if _public_bytes(key.public_key()) != _public_bytes(ca.public_key()):
        raise ConfigError(f"the key {key_path} does not belong to the CA certificate {cert_path}")
    return ca, key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ----------------------------------------------------------------------------------- gRPC
def server_credentials(tls: TLSFiles, *, require_client_cert: bool) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``. With ``require_client_cert`` (node servers) a caller
    must present a certificate issued by the CA, or the handshake fails; without it (the coordinator's
    client-facing port) any TLS client may connect and callers are authenticated by their API keys.

    The files are read (and validated) on each call, so a restarted server picks up renewed ones."""
    ca_pem, cert_pem, key_pem = tls.read()
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem if require_client_cert else None,
                                       require_client_auth=require_client_cert)


def channel_credentials(tls_or_ca: TLSFiles | str | os.PathLike, *, client_cert: bool) -> grpc.ChannelCredentials:
    """Credentials for ``grpc.secure_channel`` that trust only the cluster's CA. ``tls_or_ca`` is a
    TLSFiles, or (for a plain client, ``client_cert=False``) just the path of the CA certificate.

    ``client_cert`` presents the TLSFiles' certificate, as the coordinator and nodes must when they call
    a node. The server's certificate must name the host the channel connects to (see ``issue``)."""
    if isinstance(tls_or_ca, TLSFiles):
        ca_pem, cert_pem, key_pem = tls_or_ca.read()
        if client_cert:
            return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                                certificate_chain=cert_pem)
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    if client_cert:
        raise ConfigError("a client certificate needs TLSFiles (CA, certificate and key), not only a CA file")
    path = Path(tls_or_ca)
    ca_pem = _read(path, "CA certificate")
    ca = _parse_cert(ca_pem, path)
    _check_ca(ca, path)
    _check_dates(ca, path)
    return grpc.ssl_channel_credentials(root_certificates=ca_pem)
