"""The coordinator's HTTP API: OpenAI-compatible endpoints, Prometheus metrics and health probes.

FastAPI on uvicorn, in a thread beside the gRPC server, over the same scheduler:

- ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat
  template), streaming as server-sent events, usage counts, errors in the OpenAI error format
  (``{"error": {"message", "type", "param", "code"}}``); API keys as ``Authorization: Bearer KEY``
  unless the coordinator runs with ``--no-auth``.
- ``GET /metrics``: Prometheus text format (coordinator/metrics.py).
- ``GET /health`` (also ``/health/ready``): 200 while a complete placement serves, else 503 with the
  reason; ``GET /health/live``: 200 while the process answers. Probes and metrics need no key.

Sampling follows the OpenAI defaults (temperature 1, top_p 1); ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos`` and ``stop_token_ids`` are accepted as extra fields. Fields that
would change the result and are not implemented (``n`` > 1, ``logprobs``, penalties other than 0,
``logit_bias``, tools) are refused with a 400 naming them, never ignored.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.logs import log
from coordinator.openai_schema import ApiError, ChatBody, CompletionBody, Sampling, check_unicode
from coordinator.scheduler import Event, Request
from engine.errors import TensorfleetError
from node.security import presented

MAX_BODY_BYTES = 4 << 20  # as the gRPC receive limit (node/stream.py CONTROL_SERVER_OPTIONS)
MAX_REQUEST_ID_CHARS = 128
DISCONNECT_POLL_S = 0.5


# --------------------------------------------------------------------------------- event delivery
class LoopEvents:
    """A request's event queue for a handler on an asyncio loop: the scheduler's thread ``put``s, the
    handler awaits ``get``. Stands in for the ``queue.Queue`` a gRPC handler blocks on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server stopped, nobody is listening
            pass

    async def next(self) -> Event:
        """The next event, merged with those already waiting (as coordinator.server._coalesce does)."""
        event = await self.queue.get()
        while event.finish_reason is None and not event.error and not self.queue.empty():
            event = event.then(self.queue.get_nowait())
        return event


class Generation:
    """One admitted request: its events as they come, metrics, and cleanup (cancel, stream release)."""

    def __init__(self, api: HttpApi, http: HttpRequest, req: Request) -> None:
        self.api, self.http, self.req = api, http, req
        self.events = LoopEvents(asyncio.get_running_loop())
        req.events = self.events
        self.client = api.client_identity(http)
        self.tracker = None
        self.closed = False

    def start(self) -> None:
        coordinator = self.api.coordinator
        if not coordinator.streams.acquire(self.client):
            coordinator.metrics.reject("http", "overloaded")
            raise ApiError(429, f"this client already runs {coordinator.streams.limit} requests "
                                "(--max-streams-per-client)", type="rate_limit_exceeded")
        try:
            coordinator.scheduler.submit(self.req)
        except OverflowError as e:
            coordinator.streams.release(self.client)
            coordinator.metrics.reject("http", "overloaded")
            raise ApiError(429, str(e), type="rate_limit_exceeded") from None
        self.tracker = coordinator.metrics.track("http", len(self.req.prompt))

    async def next(self) -> Event:
        event = await self.events.next()
        if event.error:
            self.tracker.end("error")
            raise ApiError(503, event.error, type="service_unavailable")
        self.tracker.tokens(len(event.token_ids))
        if event.finish_reason:
            self.tracker.end(event.finish_reason)
        return event

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        coordinator = self.api.coordinator
        coordinator.scheduler.cancel(self.req)  # a no-op once it has finished
        coordinator.streams.release(self.client)
        if self.tracker is not None:
            self.tracker.end("cancelled")

    async def until_disconnect(self) -> None:
        while not await self.http.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    @property
    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.req.prompt), len(self.req.output)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _bearer(http: HttpRequest) -> str | None:
    """The API key of ``Authorization: Bearer KEY``, parsed as the gRPC guard parses it."""
    key = presented(http.headers.items())
    return key.strip() or None if key is not None else None


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n".encode()


# ------------------------------------------------------------------------------------------ the API
class HttpApi:
    def __init__(self, coordinator: Any) -> None:  # coordinator.server.Coordinator
        self.coordinator = coordinator
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI(title="tensorfleet", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(ApiError, lambda _r, e: e.response())
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(StarletteHTTPException, _http_error)
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])
        app.add_api_route("/health", self.ready, methods=["GET"])
        app.add_api_route("/health/ready", self.ready, methods=["GET"])
        app.add_api_route("/health/live", self.live, methods=["GET"])
        app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
        return app

    # --------------------------------------------------------------------------------- plumbing
    def authorize(self, http: HttpRequest) -> None:
        refused = self.coordinator.client_check(_bearer(http))
        if refused is not None:
            self.coordinator.metrics.reject("http", "unauthenticated")
            code, message = refused
            status = 403 if code.name == "PERMISSION_DENIED" else 401
            raise ApiError(status, message, type="authentication_error",
                           code="invalid_api_key" if status == 401 else "permission_denied")

    def client_identity(self, http: HttpRequest) -> str:
        from coordinator.server import identity

        return identity(_bearer(http), http.client.host if http.client else "")

    def _check_model(self, name: str) -> None:
        if name != self.coordinator.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.coordinator.model_name!r}", param="model", code="model_not_found")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.coordinator.model_name, "object": "model", "created": int(self.coordinator.started),
                "owned_by": "tensorfleet", "max_model_len": self.coordinator.config.max_seq_len}

    async def _admit(self, http: HttpRequest, body: Sampling, encode, max_tokens: int | None) -> Generation:  # noqa: ANN001
        """Checks, tokenization (in a worker thread: long prompts take a while) and admission."""
        self.authorize(http)
        check_unicode(body.model_dump())
        self._check_model(body.model)
        unsupported = body.unsupported()
        if unsupported:
            self.coordinator.metrics.reject("http", "invalid")
            raise ApiError(400, f"not supported by this server: {', '.join(unsupported)}")
        request_id = http.headers.get("x-request-id", "")[:MAX_REQUEST_ID_CHARS] or uuid.uuid4().hex
        try:
            ids = await run_in_threadpool(encode)
            if max_tokens is None:  # chat without a limit: up to the longest sequence
                max_tokens = max(1, self.coordinator.config.max_seq_len - len(ids))
            req = self.coordinator.new_request(ids, body.sampling(max_tokens), request_id=request_id)
        except (ValueError, TensorfleetError) as e:
            self.coordinator.metrics.reject("http", "invalid")
            raise ApiError(400, str(e)) from None
        generation = Generation(self, http, req)
        generation.start()
        return generation

    async def _respond(self, generation: Generation, stream: bool, render) -> Response:  # noqa: ANN001
        """Waits for the first event (so that a failure before any token is a proper HTTP error),
        then either collects the whole answer or streams it."""
        try:
            first = await _first_or_disconnect(generation)
        except BaseException:
            generation.close()
            raise
        if first is None:  # the client left before any token
            generation.close()
            return Response(status_code=499)
        if not stream:
            try:
                return JSONResponse(await render.whole(generation, first))
            finally:
                generation.close()
        return StreamingResponse(render.stream(generation, first), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-request-id": generation.req.request_id})

    # -------------------------------------------------------------------------------- endpoints
    async def models(self, request: HttpRequest) -> dict[str, Any]:
        self.authorize(request)
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, request: HttpRequest, model_id: str) -> dict[str, Any]:
        self.authorize(request)
        self._check_model(model_id)
        return self._model_card()

    async def completions(self, request: HttpRequest, body: CompletionBody) -> Response:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (this server does not batch prompts in one call)",
                               param="prompt")
            prompt = prompt[0]

        def encode() -> list[int]:
            return self.coordinator.encode_text(prompt) if isinstance(prompt, str) else list(prompt)

        generation = await self._admit(request, body, encode, body.max_tokens)
        echo = (prompt if isinstance(prompt, str) else self.coordinator.decode(list(prompt))) if body.echo else ""
        return await self._respond(generation, bool(body.stream), CompletionRender(self, body, echo))

    async def chat(self, request: HttpRequest, body: ChatBody) -> Response:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        generation = await self._admit(request, body, lambda: self.coordinator.encode_chat(messages),
                                       body.max_completion_tokens or body.max_tokens)
        return await self._respond(generation, bool(body.stream), ChatRender(self, body))

    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        data = await run_in_threadpool(generate_latest, self.coordinator.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    async def ready(self) -> JSONResponse:
        c = self.coordinator
        if c.serving:
            return JSONResponse({"status": "serving", "epoch": c.placer.epoch})
        return JSONResponse({"status": "not serving", "reason": c.placer.unavailable_reason or "no placement yet"},
                            status_code=503)

    async def live(self) -> dict[str, str]:
        return {"status": "alive"}


async def _first_or_disconnect(generation: Generation) -> Event | None:
    """The first event, or None if the client disconnects before it comes."""
    first = asyncio.ensure_future(generation.next())
    gone = asyncio.ensure_future(generation.until_disconnect())
    try:
        done, _ = await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if first in done:
        return first.result()
    first.cancel()
    return None


class _Render:
    """How one endpoint's answers look, whole and as server-sent events."""

    object_whole = object_chunk = ""
    id_prefix = ""

    def __init__(self, api: HttpApi, body: Sampling) -> None:
        self.api, self.body = api, body
        self.created = int(time.time())

    def envelope(self, generation: Generation, obj: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.id_prefix + generation.req.request_id, "object": obj, "created": self.created,
                "model": self.api.coordinator.model_name, "choices": choices}

    async def whole(self, generation: Generation, first: Event) -> dict[str, Any]:
        text, event = [first.text], first
        while not event.finish_reason:
            event = await generation.next()
            text.append(event.text)
        out = self.envelope(generation, self.object_whole, [self.whole_choice("".join(text), event.finish_reason)])
        out["usage"] = generation.usage
        return out

    async def stream(self, generation: Generation, first: Event) -> AsyncIterator[bytes]:
        try:
            for chunk in self.opening(generation):
                yield chunk
            event = first
            while True:
                if event.text or event.finish_reason:
                    yield _sse(self.envelope(generation, self.object_chunk,
                                             [self.delta_choice(event.text, _finish(event.finish_reason))]))
                if event.finish_reason:
                    break
                event = await generation.next()
            if self.body.include_usage:
                usage = self.envelope(generation, self.object_chunk, [])
                usage["usage"] = generation.usage
                yield _sse(usage)
            yield _sse("[DONE]")
        except ApiError as e:  # the pipeline failed mid-stream: the status line is long gone
            yield _sse(e.body())
            yield _sse("[DONE]")
        finally:
            generation.close()

    def opening(self, generation: Generation) -> list[bytes]:
        return []

    def whole_choice(self, text: str, reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def delta_choice(self, text: str, reason: str | None) -> dict[str, Any]:
        raise NotImplementedError


class CompletionRender(_Render):
    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, api: HttpApi, body: CompletionBody, echo: str) -> None:
        super().__init__(api, body)
        self.echo = echo

    def opening(self, generation: Generation) -> list[bytes]:
        if not self.echo:
            return []
        return [_sse(self.envelope(generation, self.object_chunk, [self.delta_choice(self.echo, None)]))]

    def whole_choice(self, text: str, reason: str) -> dict[str, Any]:
        return {"index": 0, "text": self.echo + text, "logprobs": None, "finish_reason": _finish(reason)}

    def delta_choice(self, text: str, reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}


class ChatRender(_Render):
    object_whole, object_chunk = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def opening(self, generation: Generation) -> list[bytes]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [_sse(self.envelope(generation, self.object_chunk, [choice]))]

    def whole_choice(self, text: str, reason: str) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": _finish(reason)}

    def delta_choice(self, text: str, reason: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": reason}


# ------------------------------------------------------------------------------------ error handlers
async def _validation_error(_request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                        for e in errors[:5])
    return ApiError(400, message or "invalid request body", param=where or None).response()


async def _http_error(_request: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    return ApiError(exc.status_code, str(exc.detail), type=kind).response()


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, declared or streamed (pure ASGI)."""

    def __init__(self, app, limit: int) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        too_big = ApiError(413, f"the request body exceeds {self.limit} bytes", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_big.response()(scope, receive, send)
            return
        seen = 0

        async def limited():  # noqa: ANN202
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI passes HTTPExceptions raised while reading the body through
                raise StarletteHTTPException(413, too_big.message)
            return message

        await self.app(scope, limited, send)


# --------------------------------------------------------------------------------------- the server
class HttpServer:
    """uvicorn in a daemon thread; the socket is bound here, so a busy port fails at once."""

    def __init__(self, api: HttpApi, host: str, port: int, tls_dir: str | None = None) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise TensorfleetError(f"cannot listen for HTTP on {host}:{port}: {e.strerror}") from None
        self.port = self.sock.getsockname()[1]
        tls = {}
        if tls_dir:
            from node.certs import TLSFiles

            files = TLSFiles.from_dir(tls_dir)
            tls = {"ssl_certfile": str(files.cert), "ssl_keyfile": str(files.key)}
        config = uvicorn.Config(api.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, **tls)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http",
                                       daemon=True)
        self.scheme = "https" if tls else "http"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise TensorfleetError("the HTTP server did not start (see the log above)")
        log(f"HTTP API (OpenAI-compatible, /metrics, /health) on {self.scheme}://"
            f"{self.sock.getsockname()[0]}:{self.port}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
