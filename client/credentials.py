"""Credentials a client process presents: where secrets are found, and bearer metadata on a channel.

Light on purpose (grpc only): the client API imports it, and so do the nodes and the coordinator
(node/security.py, which checks them). Errors are ``CredentialsError`` (a ValueError).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc

JOIN_TOKEN_FILE = "join-token"
API_KEYS_FILE = "api-keys"
ENV_HOME, ENV_API_KEY, ENV_JOIN_TOKEN = "TENSORFLEET_HOME", "TENSORFLEET_API_KEY", "TENSORFLEET_JOIN_TOKEN"
ENV_TLS_CA = "TENSORFLEET_TLS_CA"
MAX_SECRET_CHARS = 256


class CredentialsError(ValueError):
    """A secret file is missing, unsafe or unusable; the message says what to do."""


def state_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".tensorfleet")


def read_secrets(path: Path) -> list[str]:
    """The secrets in ``path`` (one per line, # comments); refuses a file others can read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CredentialsError(f"{path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 {path}")
    lines = [line.strip() for line in path.read_text().splitlines()]
    values = [line for line in lines if line and not line.startswith("#")]
    bad = [v for v in values if len(v) > MAX_SECRET_CHARS or not v.isprintable() or " " in v]
    if not values or bad:
        raise CredentialsError(f"{path} holds no usable secret (one per line, printable, no spaces)")
    return values


def find_secret(explicit: str | None, env: str, directory: Path, name: str) -> str | None:
    """A secret given on the command line, else in the environment variable ``env``, else the first of
    ``directory/name`` when that file exists; None if none is found."""
    if explicit:
        return explicit
    if os.environ.get(env):
        return os.environ[env]
    path = directory / name
    return read_secrets(path)[0] if path.exists() else None


# ----------------------------------------------------------------------------------- client side
def bearer(secret: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),) if secret else ()


class _AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, d):  # noqa: ANN001, ANN202 - grpc's ClientCallDetails
        return _CallDetails(d.method, d.timeout, (*(d.metadata or ()), *self.metadata), d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return continuation(self._details(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:  # noqa: ANN001
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def with_bearer(channel: grpc.Channel, secret: str | None) -> grpc.Channel:
    """``channel`` with ``authorization: Bearer <secret>`` on every call (as is without a secret)."""
    return grpc.intercept_channel(channel, _AddMetadata(bearer(secret))) if secret else channel


def client_channel(address: str, tls_ca: str | None) -> grpc.Channel:
    """A client's channel: TLS trusting the CA certificate file ``tls_ca`` (None: ``$TENSORFLEET_TLS_CA``),
    plaintext when there is none ("" forces plaintext)."""
    ca = os.environ.get(ENV_TLS_CA) if tls_ca is None else tls_ca
    if not ca:
        return grpc.insecure_channel(address)
    try:
        pem = Path(ca).read_bytes()
    except OSError as e:
        raise CredentialsError(f"cannot read the CA certificate {ca}: {e.strerror}") from e
    if b"BEGIN CERTIFICATE" not in pem:
        raise CredentialsError(f"{ca} is not a PEM certificate (use the ca.pem of `tensorfleet certs create`)")
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=pem))
