"""Who may call what: cluster secrets, bearer credentials on gRPC calls, and the servers' checks.

Three secrets, each sent as gRPC metadata ``authorization: Bearer <secret>``:

- the **join token** of a cluster: created by ``coordinator start`` in its state directory (file
  ``join-token``, mode 0600, printed once). Nodes present it to join, heartbeat, leave and fetch the
  model; the coordinator presents it to the nodes' Node service (LoadStage). ``node leave`` (an
  operator's command) presents it too.
- **API keys** of clients (file ``api-keys``, one per line, 0600; the first is created and printed
  once): Generate and Status. ``coordinator start --no-auth`` turns them off for local use.
- the **data key** of a placement epoch: ``data_key(join token, run, epoch)``, an HMAC that only
  holders of the join token can compute (``run``: the coordinator process's random id, public in
  Status, so that a restarted coordinator's epoch 1 gets a new key). The coordinator hands it to the
  stages in LoadStage. Every Stage.Forward and Stage.Probe call carries it; a stage refuses a key of
  an older epoch (PERMISSION_DENIED) and any other (UNAUTHENTICATED).

Missing credentials give UNAUTHENTICATED; a valid secret of the wrong kind PERMISSION_DENIED. The
standard health service stays open on every server: it tells only SERVING or NOT_SERVING, and
Kubernetes-style probes carry no credentials. Secrets are compared in constant time.

The state directory is ``--state-dir``, else ``$TENSORFLEET_HOME``, else ``~/.tensorfleet``. A client
on the same machine finds its key there (or in ``$TENSORFLEET_API_KEY``); a node its join token (or
in ``$TENSORFLEET_JOIN_TOKEN``).
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from client.credentials import (  # noqa: F401 - re-exported: the node and coordinator side use them here
    API_KEYS_FILE,
    JOIN_TOKEN_FILE,
    CredentialsError,
    bearer,
    find_secret,
    read_secrets,
    state_dir,
    with_bearer,
)
from engine.errors import ConfigError

# Need no credentials: health (probes carry none; it tells only SERVING or not) and server reflection
# (what the services and messages are, as the published .proto files say; for grpcurl and debugging).
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
OPEN_SERVICES = ("grpc.health.v1.Health", REFLECTION_SERVICE)


def new_secret(prefix: str) -> str:
    return f"{prefix}{secrets.token_urlsafe(32)}"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@dataclass(frozen=True)
class ClusterSecrets:
    join_token: str
    api_keys: tuple[str, ...]
    created: tuple[str, ...]  # the files created now (their secrets are printed once)


def load_or_create(directory: Path) -> ClusterSecrets:
    """The cluster's join token and API keys from ``directory``, created (0600) when missing."""
    created = []
    for name, prefix in ((JOIN_TOKEN_FILE, "tfjoin-"), (API_KEYS_FILE, "tfkey-")):
        path = directory / name
        if not path.exists():
            _write_private(path, new_secret(prefix) + "\n")
            created.append(name)
    try:
        return ClusterSecrets(join_token=read_secrets(directory / JOIN_TOKEN_FILE)[0],
                              api_keys=tuple(read_secrets(directory / API_KEYS_FILE)), created=tuple(created))
    except CredentialsError as e:
        raise ConfigError(str(e)) from e


def data_key(join_token: str, run: str, epoch: int) -> str:
    digest = hmac.new(join_token.encode(), f"tensorfleet data key/{run}/{epoch}".encode(), "sha256").hexdigest()
    return f"tfdata-{digest}"


# ---------------------------------------------------------------------------------- transport
def open_channel(address: str, tls_dir: str | None, *, options: list | None = None) -> grpc.Channel:
    """A channel to a cluster peer: plaintext without ``tls_dir``, else TLS presenting the cluster's
    certificate (node servers require one: mutual TLS; node/certs.py)."""
    if not tls_dir:
        return grpc.insecure_channel(address, options=options)
    from node.certs import TLSFiles, channel_credentials

    return grpc.secure_channel(address, channel_credentials(TLSFiles.from_dir(tls_dir), client_cert=True),
                               options=options)


def add_port(server: grpc.Server, address: str, tls_dir: str | None, *, require_client_cert: bool) -> int:
    """Listen on ``address``: plaintext without ``tls_dir``, else TLS (mutual if ``require_client_cert``)."""
    if not tls_dir:
        return server.add_insecure_port(address)
    from node.certs import TLSFiles, server_credentials

    creds = server_credentials(TLSFiles.from_dir(tls_dir), require_client_cert=require_client_cert)
    return server.add_secure_port(address, creds)


# ----------------------------------------------------------------------------------- server side
def presented(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer secret of a call's metadata, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


def matches(secret: str | None, candidates: Iterable[str]) -> bool:
    if not secret:
        return False
    given = secret.encode()
    found = False
    for c in candidates:  # no early exit: the time does not tell which one matched
        found |= hmac.compare_digest(given, c.encode())
    return found


# A check gets the presented secret (or None) and returns None to let the call through, or the status
# code and message to refuse it with.
Check = Callable[[str | None], tuple[grpc.StatusCode, str] | None]


def require(what: str, allowed: Callable[[], Iterable[str]], *, others: Callable[[], Iterable[str]] = tuple,
            stale: Callable[[], Iterable[str]] = tuple) -> Check:
    """A check that lets through the secrets ``allowed()`` returns: a missing or unknown one is
    UNAUTHENTICATED; one of ``others()`` (a valid secret of another kind) or ``stale()`` (an old one)
    PERMISSION_DENIED."""
    def check(secret: str | None) -> tuple[grpc.StatusCode, str] | None:
        if matches(secret, allowed()):
            return None
        if secret is None:
            return grpc.StatusCode.UNAUTHENTICATED, f"this call needs {what} (authorization: Bearer ...)"
        if matches(secret, stale()):
            return grpc.StatusCode.PERMISSION_DENIED, f"{what} of an older placement epoch"
        if matches(secret, others()):
            return grpc.StatusCode.PERMISSION_DENIED, f"these credentials do not allow this call: it needs {what}"
        return grpc.StatusCode.UNAUTHENTICATED, f"invalid credentials: this call needs {what}"
    return check


def allow_all(secret: str | None) -> None:
    return None


MAX_DETAILS_CHARS = 500


def status_details(text: str) -> str:
    """``text`` cut short enough for a status message. Error messages quote the request (a node name, a
    model name, a codec spec), and a client drops a status whose trailers pass gRPC's metadata limit
    (8 KiB; a message travels percent-encoded, up to 12 bytes a character): it would see
    RESOURCE_EXHAUSTED "received metadata size exceeds ..." instead of the status sent."""
    if len(text) <= MAX_DETAILS_CHARS:
        return text
    return f"{text[:MAX_DETAILS_CHARS]}... ({len(text)} characters)"


class Guard(grpc.ServerInterceptor):
    """Applies ``checks[service]`` (service: the full name, e.g. "tensorfleet.v1.Coordinator"; or
    ``checks[method]`` for one method, "/tensorfleet.v1.Coordinator/Status") to every call before its
    handler runs. Services of ``OPEN_SERVICES`` pass; any other call without a check is refused
    (PERMISSION_DENIED), so a service added later is closed until it is given one."""

    def __init__(self, checks: dict[str, Check]) -> None:
        self.checks = checks

    def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201
        method = details.method or ""
        service = method.strip("/").split("/")[0]
        if service in OPEN_SERVICES:
            return continuation(details)
        check = self.checks.get(method) or self.checks.get(service)
        verdict = ((grpc.StatusCode.PERMISSION_DENIED, f"{method} is not served") if check is None
                   else check(presented(details.invocation_metadata)))
        handler = continuation(details)
        if verdict is None or handler is None:
            return handler
        return _refusing(handler, *verdict)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def refuse(request_or_iterator, context):  # noqa: ANN001, ANN202
        context.abort(code, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    # The request stays raw bytes: a refused caller's payload is never parsed.
    return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


def add_reflection(server: grpc.Server, *services: str) -> None:
    """Server reflection for ``services`` and the open ones (grpcurl lists and calls them)."""
    from grpc_reflection.v1alpha import reflection

    reflection.enable_server_reflection((*services, *OPEN_SERVICES), server)
