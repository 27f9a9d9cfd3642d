"""Property-based fuzzing of the coordinator's HTTP API (a library: tests/security/test_fuzz.py and
scripts/fuzz_rpcs.py --http).

- ``cases(endpoint, model, secrets)``: one HTTP request to an endpoint: a body shaped like the endpoint's
  (OpenAI fields with valid values most of the time, any JSON value otherwise, long strings now and then),
  or any JSON, or raw random bytes, or a declared size over the limit; random credentials (the valid API
  key most of the time, or none, a wrong one, the join token, a malformed header); now and then another
  method, a query string or a random content type.
- ``perform(base_url, case)``: sends it on a fresh connection (http.client: the bytes go as drawn) and
  reads the whole answer; ``improper(outcome, case)`` says what is wrong with it, if anything.

A proper answer is a status among ``PROPER`` (never 500: an exception escaped a handler; never a
timeout or a dropped connection), with an OpenAI error object (``{"error": {"message": ...}}``) whenever
the status is an error of the API, a JSON body or an event stream that ends with ``data: [DONE]`` when
it is 200, and Prometheus text from /metrics.
"""

from __future__ import annotations

import functools
import http.client
import json
import math
import string
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st

from tests.security.fuzz import TEXT, long_text

ENDPOINTS = {  # name -> (method, path)
    "models": ("GET", "/v1/models"),
    "model": ("GET", "/v1/models/{model}"),
    "completions": ("POST", "/v1/completions"),
    "chat": ("POST", "/v1/chat/completions"),
    "metrics": ("GET", "/metrics"),
    "health": ("GET", "/health"),
    "ready": ("GET", "/health/ready"),
    "live": ("GET", "/health/live"),
}
OPEN = ("metrics", "health", "ready", "live")  # need no API key
PROPER = {200, 400, 401, 403, 404, 405, 413, 429, 499, 503}
# uvicorn's (h11's) answer to bytes that are not a valid HTTP request; the API never sees them.
PROTOCOL_ERROR = b"Invalid HTTP request received."
MAX_BODY = 4 << 20  # coordinator/http_api.py MAX_BODY_BYTES
VOCAB = 256  # the fuzzing model's (tests/security/fuzz.py MODEL)


@dataclass(frozen=True)
class Case:
    endpoint: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    declared_length: int | None = None  # a Content-Length over the limit, the body cut short
    note: str = ""

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"...(%d bytes)" % len(self.body)
        return (f"Case({self.endpoint}: {self.method} {self.path[:200]} headers={self.headers} body={body!r} "
                f"declared={self.declared_length} {self.note})")


@dataclass
class Outcome:
    status: int  # 0: no answer (timeout, connection dropped)
    body: bytes
    content_type: str
    seconds: float
    note: str = ""


@dataclass(frozen=True)
class Secrets:
    api_key: str
    join_token: str


# ------------------------------------------------------------------------------------------ JSON
def _any_json() -> st.SearchStrategy:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                       st.floats(allow_nan=True, allow_infinity=True), TEXT)
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(TEXT, inner, max_size=4)), max_leaves=10)


ANY = _any_json()


# Hypothesis draws small integers and boundary values far more often than a uniform draw would, so
# "one time in N" choices are made with a uniform random number (seeded from its draw: replayable).
UNIFORM = st.randoms(use_true_random=True)


def _pick(draw: Callable, weights: dict[str, float]) -> str:
    return draw(UNIFORM).choices(list(weights), weights=list(weights.values()))[0]


@st.composite
def _mostly(draw: Callable, valid: st.SearchStrategy, junk: st.SearchStrategy, junk_share: float = 1 / 16) -> object:
    """A value of ``valid``, or of ``junk`` ``junk_share`` of the time."""
    return draw(junk if draw(UNIFORM).random() < junk_share else valid)


def _floats(lo: float, hi: float) -> st.SearchStrategy:
    return _mostly(st.floats(lo, hi), st.sampled_from([-1.0, math.nan, math.inf, -math.inf, 1e308, hi + 1]))


def _ints(lo: int, hi: int) -> st.SearchStrategy:
    return _mostly(st.integers(lo, hi), st.one_of(st.integers(-2**70, 2**70), st.sampled_from([lo - 1, hi + 1])))


def _ids(min_size: int = 0) -> st.SearchStrategy:
    return st.lists(_ints(0, VOCAB - 1), min_size=min_size, max_size=12)


# Strategies are built once (functools.cache, module constants), never inside a draw: hypothesis validates
# every new strategy object the first time it is drawn from, which costs more than the draw itself.
_NONEMPTY_TEXT = TEXT.filter(bool)


@functools.cache
def _text() -> st.SearchStrategy:
    """Short text (not empty mostly: an empty prompt is refused before it reaches the scheduler), and
    very long text now and then."""
    return _mostly(_mostly(_NONEMPTY_TEXT, st.just("")), long_text(), 1 / 32)


# Each field's valid values (now and then just out of range); a body also gets, one time in three, one
# field of any JSON value at all.
SAMPLING = {
    "max_tokens": _ints(1, 4), "temperature": _floats(0, 2), "top_p": _floats(0.01, 1), "top_k": _ints(0, 300),
    "min_p": _floats(0, 0.99), "repetition_penalty": _floats(0.5, 2), "n": _ints(1, 1), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=20)), "seed": _ints(0, 2**40),
    "presence_penalty": _floats(0, 0), "frequency_penalty": _floats(0, 0),
    "logit_bias": st.dictionaries(TEXT, st.floats(-100, 100), max_size=2), "ignore_eos": st.booleans(),
    "stop_token_ids": _ids(), "user": TEXT,
}
COMPLETION = {"echo": st.booleans(), "logprobs": _mostly(st.none(), st.integers(0, 5)),
              "best_of": _ints(1, 1), "suffix": _mostly(st.none(), TEXT)}
CHAT = {"max_completion_tokens": _ints(1, 4), "logprobs": _mostly(st.just(False), st.just(True)),
        "tools": _mostly(st.none(), st.lists(ANY, max_size=2)),
        "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "json_object"])})}


@functools.cache
def _prompt() -> st.SearchStrategy:
    """A text, token ids, or a list of them (one: several prompts in one call are refused)."""
    one = st.one_of(_text(), _ids(1))
    return st.one_of(one, _mostly(st.lists(one, min_size=1, max_size=1), st.lists(one, max_size=3)))


@functools.cache
def _message() -> st.SearchStrategy:
    role = _mostly(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), TEXT)
    part = st.fixed_dictionaries({"type": _mostly(st.just("text"), TEXT)}, optional={"text": TEXT})
    content = st.one_of(_text(), _text(), st.none(), st.lists(part, max_size=3))
    return st.fixed_dictionaries({"role": role}, optional={"content": content, "name": TEXT})


@st.composite
def bodies(draw: Callable, endpoint: str, model: str) -> object:
    """A JSON body for ``endpoint``: the model, the prompt or messages, and some optional fields, valid
    values mostly."""
    body = {"model": draw(_mostly(st.just(model), TEXT)), "max_tokens": draw(SAMPLING["max_tokens"])}
    if endpoint == "completions":
        body["prompt"] = draw(_prompt())
        optional = {**SAMPLING, **COMPLETION}
    else:
        body["messages"] = draw(_mostly(st.lists(_message(), min_size=1, max_size=4), st.lists(ANY, max_size=2)))
        optional = {**SAMPLING, **CHAT}
    for name in draw(st.lists(st.sampled_from(tuple(sorted(optional))), max_size=5, unique=True)):
        body[name] = draw(optional[name])
    if draw(UNIFORM).random() < 1 / 3:  # one field of any type at all, or one field left out
        name = draw(st.sampled_from(tuple(sorted(body))))
        if draw(st.booleans()):
            body[name] = draw(ANY)
        else:
            del body[name]
    return body


# ----------------------------------------------------------------------------------------- requests
@functools.cache
def _auth(secrets: Secrets) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    valid = (("authorization", f"Bearer {secrets.api_key}"),)
    return _mostly(st.just(valid), st.one_of(st.just(()), st.sampled_from([
        (("authorization", "Bearer wrong-key"),), (("authorization", f"Bearer {secrets.join_token}"),),
        (("authorization", "Bearer"),), (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", f"bearer {secrets.api_key}"),), (("authorization", f"Bearer  {secrets.api_key} "),)]),
        st.text(string.printable.replace("\r", "").replace("\n", ""), max_size=40).map(
            lambda v: (("authorization", v),))), junk_share=1 / 4)


def _encode(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
_CONTENT_TYPES = _mostly(st.just("application/json"), TEXT.map(
    lambda t: "".join(ch for ch in t if ch.isprintable() and ord(ch) < 128)))


@st.composite
def cases(draw: Callable, endpoint: str, model: str, secrets: Secrets) -> Case:
    method, path = ENDPOINTS[endpoint]
    if endpoint == "model":
        name = draw(st.one_of(st.just(model), _NONEMPTY_TEXT))
        path = path.format(model=urllib.parse.quote(name, safe=""))
    rng = draw(UNIFORM)
    if rng.random() < 1 / 16:
        method = draw(_METHODS)
    if rng.random() < 1 / 16:
        path += "?" + urllib.parse.urlencode(draw(st.dictionaries(TEXT, TEXT, max_size=3)))
    headers = list(draw(_auth(secrets)))
    kind = _pick(draw, {"shaped": 12, "json": 1, "bytes": 1, "mutated": 1, "oversized": 0.25}
                 if method != "GET" else {"none": 6, "json": 1, "bytes": 1})
    body, declared, note = b"", None, kind
    if kind == "shaped":
        body = _encode(draw(bodies(endpoint, model) if endpoint in ("completions", "chat") else ANY))
    elif kind == "json":
        body = _encode(draw(ANY))
    elif kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "mutated":
        raw = bytearray(_encode(draw(bodies("chat" if endpoint != "completions" else endpoint, model))))
        for _ in range(draw(st.integers(1, 4))):
            if raw:
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        body = bytes(raw)
    elif kind == "oversized":
        declared = MAX_BODY + draw(st.integers(1, 1 << 20))
        body = b"x" * 1024
    if body or kind in ("json", "shaped"):
        ctype = draw(_CONTENT_TYPES)
        headers.append(("content-type", ctype))
    return Case(endpoint, method, path, tuple(headers), body, declared, note)


def known_cases(endpoint: str, model: str, secrets: Secrets) -> list[Case]:
    """Requests the fuzzing once found a problem with: always tried first. Numbers past the wire's int32
    and uint32 fields used to pass validation and kill the scheduler's thread when it built the step
    (every later request hung)."""
    if endpoint not in ("completions", "chat"):
        return []
    method, path = ENDPOINTS[endpoint]
    headers = (("authorization", f"Bearer {secrets.api_key}"), ("content-type", "application/json"))
    prompt = {"prompt": "hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    bodies = [{"model": model, "max_tokens": 4, **prompt, "stop_token_ids": [10102149698498164, 34, 0]},
              {"model": model, "max_tokens": 4, **prompt, "top_k": 2**40},
              {"model": model, "max_tokens": 4, **prompt, "stop_token_ids": [2**31 - 1]}]
    return [Case(endpoint, method, path, headers, _encode(b), None, "known") for b in bodies]


def perform(base_url: str, case: Case, *, timeout: float = 10.0) -> Outcome:
    """Send ``case`` on a fresh connection and read the whole answer (or note why there was none)."""
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    started = time.monotonic()
    try:
        conn.putrequest(case.method, case.path, skip_accept_encoding=True)
        for name, value in case.headers:
            conn.putheader(name, value)
        conn.putheader("content-length", str(case.declared_length or len(case.body)))
        conn.endheaders()
        try:
            conn.send(case.body)
        except OSError:
            if case.declared_length is None:
                raise
        resp = conn.getresponse()
        body = resp.read()
        return Outcome(resp.status, body, resp.getheader("content-type") or "", time.monotonic() - started)
    except (OSError, http.client.HTTPException) as e:
        return Outcome(0, b"", "", time.monotonic() - started, note=f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def improper(outcome: Outcome, case: Case) -> str | None:
    """What is wrong with ``outcome``, or None."""
    if outcome.status == 0:
        return f"no answer: {outcome.note}"
    if outcome.status not in PROPER:
        return f"status {outcome.status}: {outcome.body[:300]!r}"
    if case.method == "HEAD":
        return None
    if outcome.status != 200:
        if outcome.status == 503 and case.endpoint in ("health", "ready"):
            return None
        if outcome.status == 400 and outcome.body == PROTOCOL_ERROR:
            return None  # not HTTP (a header value with control characters...): uvicorn answers, not the API
        try:
            error = json.loads(outcome.body)["error"]
            assert isinstance(error["message"], str) and error["message"]
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"status {outcome.status} without an OpenAI error object: {outcome.body[:300]!r}"
        return None
    if outcome.content_type.startswith("text/event-stream"):
        return _check_stream(outcome.body)
    if case.endpoint == "metrics" and case.method == "GET":
        return None if b"tensorfleet_requests_running" in outcome.body else "no tensorfleet metrics in /metrics"
    try:
        json.loads(outcome.body)
    except ValueError:
        return f"200 with a body that is not JSON: {outcome.body[:300]!r}"
    return None


def _check_stream(body: bytes) -> str | None:
    events = [line[len(b"data: "):] for line in body.split(b"\n") if line.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        return f"an event stream that does not end with [DONE]: {body[-300:]!r}"
    for data in events[:-1]:
        try:
            json.loads(data)
        except ValueError:
            return f"an event that is not JSON: {data[:300]!r}"
    return None


@dataclass
class Tally:
    """Statuses per endpoint, and the improper outcomes with their cases."""

    counts: dict[str, dict[int, int]] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    details: dict[tuple[str, int, str], int] = field(default_factory=dict)  # (endpoint, status, message) -> n

    def add(self, case: Case, outcome: Outcome) -> str | None:
        per = self.counts.setdefault(case.endpoint, {})
        per[outcome.status] = per.get(outcome.status, 0) + 1
        what = (case.endpoint, outcome.status, _message_of(outcome)[:80])
        self.details[what] = self.details.get(what, 0) + 1
        reason = improper(outcome, case)
        if reason is not None:
            self.problems.append((reason, repr(case)))
        return reason

    def common_details(self, endpoint: str, n: int = 8) -> list[tuple[int, int, str]]:
        """The ``n`` most frequent (requests, status, message) of ``endpoint``."""
        rows = [(count, status, msg) for (e, status, msg), count in self.details.items() if e == endpoint]
        return sorted(rows, reverse=True)[:n]


def _message_of(outcome: Outcome) -> str:
    try:
        return str(json.loads(outcome.body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return outcome.note or outcome.body[:80].decode("utf-8", "replace")
