"""The gRPC client of a tensorfleet cluster: generate text and read the cluster's status.

    from client.api import TensorfleetClient

    with TensorfleetClient("head:50051") as tf:
        for delta in tf.generate_stream("Once upon a time", max_tokens=32, seed=1):
            print(delta.text, end="", flush=True)
        print(tf.generate([1, 2, 3], max_tokens=8).token_ids)
        print(format_status(tf.status()))

Every failed call raises ``ClientError`` (the gRPC status code's name and a message a person can act
on); arguments that cannot form a valid request raise ``ValueError``/``TypeError`` before anything is
sent. Closing a ``generate_stream`` iterator early (``close()``, ``break`` out of a ``for`` loop and
dropping it, or an exception in the consumer) cancels the request on the coordinator, which then
frees its slot.

Only grpc and the generated stubs are imported: no torch, numpy or engine.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from client import DEFAULT_COORDINATOR_PORT
from client.credentials import API_KEYS_FILE, ENV_API_KEY, client_channel, find_secret, state_dir, with_bearer
from client.display import format_status, status_to_dict, status_to_json
from tensorfleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

__all__ = [
    "ClientError",
    "Completion",
    "Delta",
    "TensorfleetClient",
    "format_status",
    "status_to_dict",
    "status_to_json",
]

DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_COORDINATOR_PORT}"

_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1
_SEED_MAX = 2**63 - 1

# Fragments of the details grpc-core writes when the transport fails (no server, refused, reset,
# name not resolved). An UNAVAILABLE without any of them came from the coordinator itself, whose
# details are kept as they are.
_TRANSPORT_FAILURES = (
    "failed to connect",
    "connection refused",
    "connection reset",
    "connections to all backends failing",
    "dns resolution failed",
    "name resolution",
    "socket closed",
    "broken pipe",
    "no route to host",
    "network is unreachable",
    "endpoint read failed",
    "handshake",
)



class ClientError(Exception):
    """A call to the coordinator failed. ``code`` is the gRPC status code's name ("UNAVAILABLE", ...),
    ``details`` what went wrong; ``str(error)`` is ``"CODE: details"``."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Completion:
    """A whole generation. ``finish_reason`` is "stop", "length" or "cancelled"."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """What one streamed response added: new tokens and their text (the text may lag the tokens by a
    few while a multi-byte character or a possible stop string is incomplete). ``finish_reason`` is
    None until the last delta."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None


class TensorfleetClient:
    """A connection to a coordinator's client-facing gRPC service.

    ``address`` is a gRPC target ("host:port", "[::1]:50051", "unix:/path"). ``timeout`` bounds each
    call in seconds (a whole generation, for the streaming call); None waits as long as it takes.
    ``channel``, when given, is used instead of opening one to ``address`` (for TLS or custom
    options); the caller keeps ownership of it and ``close()`` leaves it open. ``address`` then only
    names the coordinator in error messages.

    ``api_key`` is sent with every call (``authorization: Bearer``). None looks for one in
    ``$TENSORFLEET_API_KEY``, then in the local coordinator's state directory (``$TENSORFLEET_HOME``
    or ~/.tensorfleet, file ``api-keys``); "" sends none (a coordinator started with ``--no-auth``).
    ``tls_ca``: the CA certificate to trust for TLS (None: ``$TENSORFLEET_TLS_CA``; "" or unset: plaintext).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        api_key: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds (or None for no limit)")
        self.address = address
        self.timeout = timeout
        self._owns_channel = channel is None
        self._channel = client_channel(address, tls_ca) if channel is None else channel
        if api_key is None:
            api_key = find_secret(None, ENV_API_KEY, state_dir(), API_KEYS_FILE)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(with_bearer(self._channel, api_key))
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel (if this client opened it); RPCs still running are cancelled."""
        if not self._closed:
            self._closed = True
            if self._owns_channel:
                self._channel.close()

    def __enter__(self) -> TensorfleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this TensorfleetClient is closed")

    # -- calls ----------------------------------------------------------------------------------

    def generate_stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Iterable[str] = (),
        stop_token_ids: Iterable[int] = (),
        ignore_eos: bool = False,
        request_id: str | None = None,
    ) -> Iterator[Delta]:
        """Streams the generation of ``prompt`` (text, tokenized by the coordinator, or token ids).

        ``temperature=0`` is greedy; ``top_k=0``, ``top_p=1``, ``min_p=0`` and
        ``repetition_penalty=1`` are off; ``max_tokens=None`` takes the server's default; ``seed``
        makes sampling reproducible (None lets the server pick one); ``request_id=None`` lets the
        coordinator assign one (every delta carries it). The request is validated here and sent on
        the first ``next()``; closing the iterator cancels it.
        """
        self._check_open()
        request = build_request(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            request_id=request_id,
        )
        return self._deltas(request)

    def generate(self, prompt: str | Sequence[int], **sampling) -> Completion:
        """Generates a whole completion: ``generate_stream`` collected (same keyword arguments)."""
        self._check_open()
        request = build_request(prompt, **sampling)
        request_id = request.request_id
        text: list[str] = []
        token_ids: list[int] = []
        last = coordinator_pb2.GenerateResponse()
        for response in self._responses(request):
            request_id = response.request_id or request_id
            text.append(response.text_delta)
            token_ids.extend(response.token_ids)
            last = response
        if last.HasField("usage"):
            prompt_tokens, completion_tokens = last.usage.prompt_tokens, last.usage.completion_tokens
        else:
            prompt_tokens = len(request.token_ids.ids)
            completion_tokens = len(token_ids)
        return Completion(
            request_id=request_id,
            text="".join(text),
            token_ids=token_ids,
            finish_reason=_finish_reason(last.finish_reason) or "",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    def status(self, *, timeout: float | None = None) -> coordinator_pb2.StatusResponse:
        """The cluster's nodes, placement and load, as the protobuf ``StatusResponse``
        (``status_to_dict`` and ``format_status`` turn it into a dict or readable tables).
        ``timeout`` overrides the client's for this call."""
        self._check_open()
        timeout = self.timeout if timeout is None else timeout
        try:
            return self._stub.Status(coordinator_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise _client_error(e, self.address, timeout=timeout, mid_stream=False) from e

    def _deltas(self, request: coordinator_pb2.GenerateRequest) -> Iterator[Delta]:
        responses = self._responses(request)
        try:
            for response in responses:
                yield _delta(response)
        finally:
            responses.close()  # cancels the RPC if the consumer stopped early

    def _responses(self, request: coordinator_pb2.GenerateRequest) -> Iterator[coordinator_pb2.GenerateResponse]:
        # A generator, so that nothing is sent before the first next() and the RPC is cancelled in
        # `finally` when the consumer closes (or drops) the iterator before the stream ends.
        call = self._stub.Generate(request, timeout=self.timeout)
        received = finished = False
        try:
            for response in call:
                received = True
                finished = response.finish_reason != coordinator_pb2.FINISH_REASON_UNSPECIFIED
                yield response
        except grpc.RpcError as e:
            raise _client_error(e, self.address, timeout=self.timeout, mid_stream=received) from e
        finally:
            call.cancel()  # a no-op once the RPC has ended
        if not finished:
            raise ClientError(
                "INTERNAL",
                f"the coordinator at {self.address} ended the Generate stream of request "
                f"{request.request_id or '(unnamed)'} without a finish reason",
            )


def build_request(
    prompt: str | Sequence[int],
    *,
    max_tokens: int | None = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: str | Iterable[str] = (),
    stop_token_ids: Iterable[int] = (),
    ignore_eos: bool = False,
    request_id: str | None = None,
) -> coordinator_pb2.GenerateRequest:
    """The GenerateRequest for these arguments, validated (ValueError/TypeError name the bad value)."""
    if request_id is not None and not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str or None, got {type(request_id).__name__}")
    _check_range("temperature", temperature, low=0.0)
    _check_range("top_p", top_p, low=0.0, high=1.0, low_open=True)
    _check_range("min_p", min_p, low=0.0, high=1.0, high_open=True)
    _check_range("repetition_penalty", repetition_penalty, low=0.0, low_open=True)
    sampling = common_pb2.SamplingParams(
        temperature=temperature,
        top_k=_int_in("top_k", top_k, 0, _UINT32_MAX),
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop_token_ids=[_int_in("stop token id", t, 0, _INT32_MAX) for t in stop_token_ids],
        stop=_stop_strings(stop),
        ignore_eos=bool(ignore_eos),
    )
    if max_tokens is not None:
        sampling.max_tokens = _int_in("max_tokens", max_tokens, 1, _UINT32_MAX)
    if seed is not None:
        sampling.seed = _int_in("seed", seed, 0, _SEED_MAX)
    request = coordinator_pb2.GenerateRequest(request_id=request_id or "", sampling=sampling)
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, (bytes, bytearray, memoryview)):
        raise TypeError("prompt must be a str or a sequence of token ids, got bytes (decode it first)")
    else:
        ids = [_int_in("prompt token id", t, 0, _INT32_MAX) for t in prompt]
        if not ids:
            raise ValueError("prompt is an empty list of token ids")
        request.token_ids.ids.extend(ids)
    return request


def _check_range(
    name: str,
    value: float,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        if high == math.inf:
            interval = f"> {low:g}" if low_open else f">= {low:g}"
        raise ValueError(f"{name}={value} is out of range: it must be {interval}")


def _int_in(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        number = operator.index(value)  # ints, and integer scalars of other libraries
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{name}={number} is out of range {low}..{high}")
    return number


def _stop_strings(stop: str | Iterable[str]) -> list[str]:
    strings = [stop] if isinstance(stop, str) else list(stop)
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty str, got {s!r}")
    return strings


def _finish_reason(value: int) -> str | None:
    if value == coordinator_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        return coordinator_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()
    except ValueError:  # a newer server's reason
        return f"unknown_{value}"


def _delta(response: coordinator_pb2.GenerateResponse) -> Delta:
    return Delta(
        request_id=response.request_id,
        text=response.text_delta,
        token_ids=list(response.token_ids),
        finish_reason=_finish_reason(response.finish_reason),
    )


def _client_error(err: grpc.RpcError, address: str, *, timeout: float | None, mid_stream: bool) -> ClientError:
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = (err.details() if callable(getattr(err, "details", None)) else None) or ""
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    transport = any(fragment in details.lower() for fragment in _TRANSPORT_FAILURES)
    if code == grpc.StatusCode.UNAVAILABLE and transport:
        if mid_stream:
            message = f"lost the connection to the coordinator at {address} in the middle of the stream ({details})"
        else:
            message = f"cannot reach the coordinator at {address} (is `coordinator start` running?)"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline exceeded" in details.lower() and timeout is not None:
        message = f"the coordinator at {address} did not finish within the timeout of {timeout:g} s"
    elif code == grpc.StatusCode.UNIMPLEMENTED and details in ("", "Method not found!"):
        message = f"the server at {address} does not serve this call (is it a tensorfleet coordinator?)"
    else:
        message = details or f"no details from the coordinator at {address}"
    return ClientError(name, message)
