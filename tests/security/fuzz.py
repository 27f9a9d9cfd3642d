"""Property-based fuzzing of the gRPC surface (a library: tests/security/test_fuzz.py and scripts/fuzz_rpcs.py).

- ``messages(descriptor, hints)``: a hypothesis strategy of random protobuf messages of any type, built from
  its descriptor: every scalar type with its extremes (NaN and infinities, the integer bounds), random
  unicode and, now and then, very long strings and bytes (within the 4 MB limit of the control servers),
  repeated fields of varied length (sometimes thousands of elements), nested messages, maps, oneofs and
  proto3 optional fields, enum values known and unknown. ``hints`` (field path -> strategy) steer some
  fields towards values that get past validation (a real epoch, token ids in the vocabulary...), so the
  handlers behind the checks are fuzzed too; a hinted field still takes random values a quarter of the time
  (or as often as its ``Always`` hint's own strategy says).
- ``cases(rpc, facts, secrets)``: what one call sends: a message (or a stream of them) or raw random bytes
  (random or a mutated serialized message), with random credentials (the valid one most of the time, or
  none, a wrong one, one of another kind, an older epoch's, a malformed header), so the auth layer and
  the handlers are both fuzzed.
- ``perform(channel, case)``: one call through a generic channel method (the request goes as the bytes
  given), reading at most a few responses of a stream; ``improper(outcome, case)`` says what is wrong
  with its status, if anything.

A proper status is any code but UNKNOWN (an exception escaped a handler), INTERNAL (except gRPC's own
"Exception deserializing request!" for raw bytes that do not parse), DEADLINE_EXCEEDED (a hang: valid
requests are bounded so that none takes long), CANCELLED (nothing here cancels a call before it ends)
and UNAVAILABLE with a transport error (the server went away).
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import assume
from hypothesis import strategies as st

from tensorfleet.v1 import common_pb2, coordinator_pb2, node_pb2

# gRPC python's details when a request's bytes do not parse (grpc/_server.py, _receive_message); a
# refused caller's bytes are never parsed (node/security.py Guard), so this comes only with the valid secret.
DESERIALIZE_DETAILS = "Exception deserializing request!"
MAX_CONTROL_BYTES = 4 << 20  # what the coordinator and node daemons accept (node/stream.py)
LONG_CHARS = 1_500_000  # the longest string drawn: 1.5 MB of ASCII, or up to 6 MB of wider characters
LONG_ITEMS = 20_000  # the longest repeated scalar field drawn
TRANSPORT_ERRORS = ("failed to connect", "connection refused", "socket closed", "connection reset",
                    "broken pipe", "endpoint closing", "goaway")

# ---------------------------------------------------------------------------------------------- RPCs
SERVICES = {"Coordinator": coordinator_pb2, "Node": node_pb2, "Stage": node_pb2}
CLIENT_RPCS = ("Generate", "Status")  # the Coordinator's RPCs for API keys; the others need the join token


@dataclass(frozen=True)
class Rpc:
    name: str  # unique over the services: "Generate", "LoadStage", "Forward", ...
    service: str  # "Coordinator" | "Node" | "Stage"
    input: Descriptor
    request_streaming: bool
    response_streaming: bool

    @property
    def path(self) -> str:
        return f"/tensorfleet.v1.{self.service}/{self.name}"

    @property
    def secret(self) -> str:
        """Which kind of secret the call needs: "client", "node" or "data" (node/security.py)."""
        if self.service == "Stage":
            return "data"
        return "client" if self.name in CLIENT_RPCS else "node"


def _rpcs() -> dict[str, Rpc]:
    out = {}
    for service, module in SERVICES.items():
        for m in module.DESCRIPTOR.services_by_name[service].methods:
            out[m.name] = Rpc(m.name, service, m.input_type, m.client_streaming, m.server_streaming)
    return out


RPCS = _rpcs()

# ------------------------------------------------------------------------------------------ scalars
INT_RANGES = {FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
              FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
              FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
              FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
              FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1)}
SPECIAL_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1.7976931348623157e308, -1.7976931348623157e308,
                  math.nan, math.inf, -math.inf)
# Any unicode but lone surrogates (a Python str that protobuf cannot encode: not something a peer can send).
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=24)


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    extremes = sorted({v for v in (lo, hi, 0, 1, -1, lo + 1, hi - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                                   2**63 - 1, 2**63, -2**31, -2**63) if lo <= v <= hi})
    return st.one_of(st.sampled_from(extremes), st.integers(max(lo, -3), min(hi, 300)), st.integers(lo, hi))


def floats(width: int = 64) -> st.SearchStrategy[float]:
    specials = st.sampled_from(SPECIAL_FLOATS if width == 64 else (0.0, -0.0, 1.0, -1.0, 0.5, math.nan, math.inf,
                                                                   -math.inf, 3.4028234663852886e38))
    return st.one_of(specials, st.floats(width=width), st.floats(0, 2, width=width))


# Strategies are built once, never inside a draw: hypothesis validates every new strategy object the first
# time it is drawn from, which costs more than the draw itself (a few fuzz cases a second on 2 cores).
_ONE_IN_4, _ONE_IN_5, _ONE_IN_16 = st.integers(0, 3), st.integers(0, 4), st.integers(0, 15)  # 0: one time in n
_COIN = st.booleans()
_LONG_PIECE = st.one_of(st.just("x"), st.text(string.printable, min_size=1, max_size=8), TEXT.filter(bool))


@st.composite
def long_text(draw: Callable) -> str:
    """A very long string: a random piece repeated (cheap to draw), mostly ASCII."""
    piece = draw(_LONG_PIECE)
    n = draw(st.integers(1000, LONG_CHARS))
    return (piece * (n // len(piece) + 1))[:n]


@st.composite
def long_bytes(draw: Callable) -> bytes:
    piece = draw(st.binary(min_size=1, max_size=16))
    n = draw(st.integers(1000, MAX_CONTROL_BYTES - 1024))
    return (piece * (n // len(piece) + 1))[:n]


def texts(*, long: bool = True) -> st.SearchStrategy[str]:
    """Short random strings; with ``long``, one in 16 is very long."""
    short = st.one_of(TEXT, st.text(string.printable, max_size=12))
    return _now_and_then(long_text(), short) if long else short


def binaries(*, long: bool = True) -> st.SearchStrategy[bytes]:
    short = st.binary(max_size=40)
    return _now_and_then(long_bytes(), short) if long else short


def _now_and_then(rare: st.SearchStrategy, usual: st.SearchStrategy) -> st.SearchStrategy:
    return st.integers(0, 15).flatmap(lambda i: rare if i == 0 else usual)


def scalar(f: FieldDescriptor, *, long: bool) -> st.SearchStrategy:
    t = f.type
    if t in INT_RANGES:
        return ints(*INT_RANGES[t])
    if t == FieldDescriptor.TYPE_DOUBLE:
        return floats(64)
    if t == FieldDescriptor.TYPE_FLOAT:
        return floats(32)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return texts(long=long)
    if t == FieldDescriptor.TYPE_BYTES:
        return binaries(long=long)
    if t == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers travel too
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), ints(-2**31, 2**31 - 1))
    raise TypeError(f"no strategy for field {f.full_name} of type {t}")


# ----------------------------------------------------------------------------------------- messages
@st.composite
def repeat_to(draw: Callable, items: st.SearchStrategy[list], longest: int) -> list:
    """A list drawn from ``items``; now and then cycled out to a long length (long repeated fields are
    cheap to draw this way)."""
    values = draw(items)
    if values and draw(_ONE_IN_16) == 0:
        n = draw(st.integers(len(values), longest))
        values = (values * (n // len(values) + 1))[:n]
    return values


def _synthetic(f: FieldDescriptor) -> bool:
    """Whether ``f``'s oneof is the synthetic one of a proto3 ``optional`` field."""
    o = f.containing_oneof
    return o is not None and len(o.fields) == 1 and o.name == "_" + f.name


def messages(descriptor: Descriptor, hints: Mapping[str, st.SearchStrategy] | None = None,
             *, long: bool = True) -> st.SearchStrategy:
    """Random messages of ``descriptor``'s type. ``hints`` maps a field path ("sampling.max_tokens"; a
    repeated field's path names the whole list) to a strategy of its value (a list for repeated fields, a
    message for message fields, None: leave it unset); "oneof:NAME" picks a oneof's field name (or None).
    ``long``: very long strings, bytes and repeated fields may be drawn (never inside repeated messages)."""
    return _Builder(dict(hints or {})).message(descriptor, "", 0, long)


class _Builder:
    """Builds (once per field and context) the strategies of a message type's fields."""

    def __init__(self, hints: dict[str, st.SearchStrategy]) -> None:
        self.hints = hints
        self.cache: dict[tuple, st.SearchStrategy] = {}

    def message(self, descriptor: Descriptor, path: str, depth: int, long: bool) -> st.SearchStrategy:
        key = (descriptor.full_name, path, depth, long)
        if key not in self.cache:
            fields = [(f, _join(path, f.name), self.field(f, _join(path, f.name), depth, long))
                      for f in descriptor.fields]
            oneofs = []  # (oneof name, strategy of its chosen field's name or None); not the synthetic ones
            for o in descriptor.oneofs:
                if len(o.fields) == 1 and o.name == "_" + o.fields[0].name:
                    continue
                hint = f"oneof:{_join(path, o.name)}"
                oneofs.append((o.name, self.hints[hint] if hint in self.hints
                               else st.sampled_from([None, *(f.name for f in o.fields)])))
            self.cache[key] = _message(descriptor, self.hints, fields, oneofs)
        return self.cache[key]

    def field(self, f: FieldDescriptor, path: str, depth: int, long: bool) -> st.SearchStrategy:
        if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            return st.dictionaries(scalar(key_f, long=False), self.value(value_f, path, depth, long=False),
                                   max_size=3 if depth < 4 else 0)
        if f.is_repeated:
            item = self.value(f, path, depth, long=False)
            size = 4 if f.type == FieldDescriptor.TYPE_MESSAGE else 6
            longest = (200 if f.type == FieldDescriptor.TYPE_MESSAGE else LONG_ITEMS) if long else 16
            return repeat_to(st.lists(item, max_size=size if depth < 4 else 0), longest)
        return self.value(f, path, depth, long=long)

    def value(self, f: FieldDescriptor, path: str, depth: int, *, long: bool) -> st.SearchStrategy:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            return st.deferred(lambda: self.message(f.message_type, path, depth + 1, long))
        return scalar(f, long=long)


@st.composite
def _message(draw: Callable, descriptor: Descriptor, hints: dict, fields: list, oneofs: list) -> Any:
    msg = message_factory.GetMessageClass(descriptor)()
    chosen = {name: draw(strategy) for name, strategy in oneofs}
    for f, fpath, strategy in fields:
        o = f.containing_oneof
        if o is not None and not _synthetic(f) and chosen.get(o.name) != f.name:
            continue
        if fpath in hints and (isinstance(hints[fpath], Always) or draw(_ONE_IN_4) > 0):
            value = draw(hints[fpath].strategy if isinstance(hints[fpath], Always) else hints[fpath])
        elif (o is None or _synthetic(f)) and not f.is_repeated and not draw(_COIN):
            continue  # unset (a oneof's chosen field is always set)
        else:
            value = draw(strategy)
        if value is not None:
            _assign(msg, f, value)
    return msg


@dataclass(frozen=True)
class Always:
    """A hint used every time (its strategy brings its own random values), not three times in four."""

    strategy: st.SearchStrategy


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _assign(msg: Any, f: FieldDescriptor, value: Any) -> None:
    target = getattr(msg, f.name)
    if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
        for k, v in value.items():
            if f.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif f.is_repeated:
        target.extend(value)
    elif f.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(msg, f.name, value)


# ---------------------------------------------------------------------------------------- raw bytes
_EDITS = st.sampled_from(["set", "insert", "delete", "truncate"])
_EDIT_COUNT, _BYTE, _DELETED = st.integers(1, 4), st.integers(0, 255), st.integers(1, 8)
_INSERTED = st.binary(min_size=1, max_size=8)


@st.composite
def mutated(draw: Callable, serialized: bytes) -> bytes:
    """``serialized`` with a few random edits: bytes overwritten, inserted or dropped, or cut short."""
    data = bytearray(serialized)
    for _ in range(draw(_EDIT_COUNT)):
        op = draw(_EDITS)
        at = draw(st.integers(0, len(data)))
        if op == "set" and at < len(data):
            data[at] = draw(_BYTE)
        elif op == "insert":
            data[at:at] = draw(_INSERTED)
        elif op == "delete":
            del data[at:at + draw(_DELETED)]
        else:
            del data[at:]
    return bytes(data)


def raw_payloads(descriptor: Descriptor, hints: Mapping[str, st.SearchStrategy]) -> st.SearchStrategy[bytes]:
    """Bytes sent as a serialized request: random ones, or a random message with a few bytes changed."""
    as_bytes = messages(descriptor, hints, long=False).map(lambda m: m.SerializeToString())
    return st.one_of(st.binary(max_size=64), as_bytes.flatmap(mutated), as_bytes.flatmap(mutated),
                     st.sampled_from([b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" * 11, b"\x80" * 10,
                                      b"\x0b\x0c", b"\x0a\x05ab"]))


# ---------------------------------------------------------------------------------- what is fuzzed
@dataclass(frozen=True, kw_only=True)
class Facts:
    """What the hints know about the cluster under test (re-read before each run: placements change)."""

    vocab_size: int = 320
    max_seq_len: int = 16
    hidden_size: int = 64
    num_layers: int = 4
    num_slots: int = 2
    epoch: int = 1
    model: str = ""
    tensor_names: tuple[str, ...] = ()
    node_names: tuple[str, ...] = ()  # ids and display names of the real nodes: never asked to leave
    num_targets: int = 1  # servers of the RPC's kind (node daemons, stage leaders); cases pick one


@dataclass(frozen=True, kw_only=True)
class Secrets:
    client: str
    node: str
    data: str = ""  # this epoch's data key
    stale_data: str = ""  # an older epoch's


CODECS = ["", "exact", "int8", "int4", "lowrank:rank=2", "auto", "auto:int8", "auto:exact", "int8:block=0",
          "int8:block=-1", "int8:block=99999999999999999999", "int8:outliers=-1", "int8:rotate=maybe",
          "lowrank:rank=0", "lowrank:min_rate=nan", "lowrank:min_rate=inf", "lowrank:error_feedback=true",
          "int4:block=3", "int8:block=64,block=64", "nope", ":", "int8:=", "int8:block"]


def _sampling(facts: Facts) -> st.SearchStrategy[common_pb2.SamplingParams]:
    """Sampling parameters: valid ones (at most 4 tokens) half the time, else each field near its bounds."""
    vocab = facts.vocab_size
    token = st.one_of(st.integers(0, vocab - 1), st.sampled_from([vocab, -1, 2**31 - 1, -2**31]))
    valid = st.builds(
        common_pb2.SamplingParams, temperature=st.sampled_from([0.0, 0.0, 0.7, 1.0, 1e-9, 100.0]),
        top_k=st.sampled_from([0, 1, 5, vocab, vocab + 1]), top_p=st.sampled_from([0.9, 1.0, 1e-12]),
        min_p=st.sampled_from([0.0, 0.1, 0.999999]), repetition_penalty=st.sampled_from([1.0, 1.3, 0.5, 1e-30, 1e30]),
        max_tokens=st.integers(1, 4), stop_token_ids=st.lists(st.integers(0, vocab - 1), max_size=3),
        stop=st.lists(texts(long=False).filter(bool), max_size=3), seed=st.integers(0, 2**63 - 1),
        ignore_eos=st.booleans())
    near = messages(common_pb2.SamplingParams.DESCRIPTOR, {
        "temperature": st.sampled_from([0.0, 0.7, -1.0, -0.0, math.nan, math.inf]),
        "top_p": st.sampled_from([1.0, 0.0, 1.5, -0.0, math.nan]), "min_p": st.sampled_from([0.0, 1.0, -0.5, math.nan]),
        "repetition_penalty": st.sampled_from([1.0, 0.0, -1.0, math.inf, math.nan]), "max_tokens": st.integers(0, 4),
        "stop_token_ids": st.lists(token, max_size=3), "seed": st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1])})
    return st.one_of(valid, near)


def _hints(rpc: str, facts: Facts) -> dict[str, st.SearchStrategy]:
    """Values that get past the first checks of each RPC, so that what lies behind them is fuzzed too."""
    vocab, seq = facts.vocab_size, facts.max_seq_len
    token = st.one_of(st.integers(0, vocab - 1), st.sampled_from([vocab, -1, 2**31 - 1, -2**31]))
    tokens = st.one_of(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=seq - 4),
                       st.lists(token, min_size=1, max_size=seq))
    if rpc == "Generate":
        prompt = [None, "text", "text", "token_ids", "token_ids", "token_ids", "token_ids"]
        return {"oneof:prompt": st.sampled_from(prompt),
                "token_ids.ids": tokens, "sampling": _sampling(facts),
                "text": st.one_of(texts(long=False).filter(bool), st.sampled_from(["hello", "a dog", "{{ x }}"]))}
    if rpc == "Join":  # most joins are invalid: a valid one adds a member that never heartbeats
        devices = st.lists(messages(common_pb2.DeviceInfo.DESCRIPTOR, {
            "kind": st.sampled_from([1, 2, 0, 9]), "free_memory_bytes": st.sampled_from([0, 1 << 20, 1 << 40]),
            "index": st.integers(0, 2)}), min_size=1, max_size=3)
        return {"node.address": st.one_of(st.just(""), st.just(""), st.sampled_from(
                    ["127.0.0.1:1", "localhost:1", "[::1]:1", "unix:/nonexistent/x", "256.0.0.1:5", "x"])),
                "node.devices": st.one_of(st.just([]), st.just([]), devices)}
    if rpc == "Heartbeat":
        return {"node_id": st.one_of(texts(long=False), st.sampled_from(["", "node0", "node0-000000"]))}
    if rpc == "Leave":
        near = [n + s for n in facts.node_names for s in (" ", "-", "x")] + [n.upper() for n in facts.node_names]
        return {"node": st.one_of(texts(), st.sampled_from(["", *near] if near else [""]))}
    if rpc == "FetchWeights":
        names = facts.tensor_names or ("x",)
        return {"names": st.one_of(st.lists(st.sampled_from(names), min_size=1, max_size=3),
                                   st.lists(st.one_of(st.sampled_from(names), texts(long=False)), max_size=4))}
    if rpc == "LoadStage":  # near-valid: each check of the node daemon fails in turn (valid ones are not sent)
        def near(values: list, strategy: st.SearchStrategy) -> Always:
            return Always(st.one_of(st.sampled_from(values), st.sampled_from(values), strategy))

        layers = st.integers(0, facts.num_layers - 1).flatmap(lambda start: st.builds(
            common_pb2.LayerRange, start=st.just(start), end=st.integers(start + 1, facts.num_layers)))
        return {"epoch": near([common_pb2.PlacementEpoch(value=facts.epoch + 1)],
                              messages(common_pb2.PlacementEpoch.DESCRIPTOR)),
                "model": near([facts.model, facts.model, "", "other"], texts()),
                "layers": Always(st.one_of(layers, layers, messages(common_pb2.LayerRange.DESCRIPTOR))),
                "num_slots": near([1, 2, 2, 0], ints(0, 2**32 - 1)),
                "max_seq_len": near([seq, seq, 1, 0], ints(0, 2**32 - 1)),
                "local_ranks": near([[node_pb2.LocalRank(device_index=0, tp_rank=0)]],
                                    st.lists(messages(node_pb2.LocalRank.DESCRIPTOR, {
                                        "device_index": st.sampled_from([0, 1]), "tp_rank": st.sampled_from([0, 1])}),
                                        max_size=3)),
                "group.world_size": st.sampled_from([0, 1, 2]), "dtype": st.sampled_from([0, 1, 2, 3, 4, 99]),
                "codec": near(CODECS, texts()), "tp_codec": near(CODECS, texts())}
    if rpc == "Forward":
        sampling = _sampling(facts)
        epochs = st.one_of(st.just(facts.epoch), st.just(facts.epoch), st.just(facts.epoch), st.just(facts.epoch),
                           st.sampled_from([facts.epoch - 1, facts.epoch + 1, 0]), ints(0, 2**64 - 1))
        fuzzed = messages(node_pb2.SequenceStep.DESCRIPTOR, {
            "slot": st.sampled_from([0, 1, facts.num_slots, 2**32 - 1]),
            "start": st.sampled_from([0, 0, 1, seq - 1, seq, seq + 1, 2**32 - 1]),
            "token_ids": st.one_of(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4),
                                   st.lists(token, max_size=seq + 2)),
            "seed": st.sampled_from([0, 7, 2**63 - 1, 2**63, 2**64 - 1]), "sampling": sampling})
        return {"epoch": Always(epochs.map(lambda e: common_pb2.PlacementEpoch(value=e))),
                "sequences": Always(st.one_of(_valid_sequences(facts, sampling), _valid_sequences(facts, sampling),
                                              st.lists(fuzzed, min_size=1, max_size=3),
                                              st.lists(messages(node_pb2.SequenceStep.DESCRIPTOR), max_size=3))),
                "encoded_hidden.codec": st.sampled_from(CODECS),
                "encoded_hidden.dtype": st.sampled_from([1, 2, 3, 4, 0])}
    return {}


@st.composite
def _valid_sequences(draw: Callable, facts: Facts, sampling: st.SearchStrategy) -> list[node_pb2.SequenceStep]:
    """The sequences of a step that a stage computes: distinct slots, in-vocabulary tokens within the
    KV cache, valid sampling."""
    slots = draw(st.lists(st.integers(0, facts.num_slots - 1), min_size=1, max_size=facts.num_slots, unique=True))
    out = []
    for slot in slots:
        start = draw(st.integers(0, facts.max_seq_len - 1))
        ids = draw(st.lists(st.integers(0, facts.vocab_size - 1), min_size=1, max_size=facts.max_seq_len - start))
        out.append(node_pb2.SequenceStep(request_id=draw(TEXT), slot=slot, start=start, token_ids=ids,
                                         sampling=draw(sampling), seed=draw(st.integers(0, 2**63 - 1))))
    return out


_FLOAT32_SPECIALS = st.sampled_from([b"\0\0\x80\x7f", b"\0\0\xc0\x7f", b"\0\0\x80?"])  # inf, NaN, 1.0


@functools.cache
def _hidden_widths(hidden_size: int) -> st.SearchStrategy[int]:
    return st.sampled_from([hidden_size] * 5 + [hidden_size + 1])


@functools.cache
def _float32_data(values: int) -> st.SearchStrategy[bytes]:
    """``values`` float32 values as bytes: random bits, or one special value repeated."""
    return st.one_of(st.binary(min_size=values * 4, max_size=values * 4),
                     _FLOAT32_SPECIALS.map(lambda v: v * values))


@st.composite
def _step_with_hidden(draw: Callable, facts: Facts, steps: st.SearchStrategy) -> node_pb2.StepMessage:
    """A step whose hidden states fit its tokens (random float32 bits, NaN and inf included) three times
    in four: only such steps reach the layers of a stage after the first."""
    msg = draw(steps)
    n = sum(len(s.token_ids) for s in msg.sequences)
    if msg.sequences and n <= 64 and draw(_ONE_IN_4) > 0:
        msg.ClearField("encoded_hidden")
        width = draw(_hidden_widths(facts.hidden_size))
        data = draw(_float32_data(n * width))
        msg.hidden.CopyFrom(common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[n, width], data=data))
    return msg


def request_messages(rpc: Rpc, facts: Facts) -> st.SearchStrategy:
    hints = _hints(rpc.name, facts)
    if rpc.name == "Forward":
        return _step_with_hidden(facts, messages(rpc.input, hints))
    return messages(rpc.input, hints)


# ----------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    rpc: Rpc
    credential: str  # "valid", "missing", "wrong", "other-kind", "stale", "malformed", "duplicate"
    accepted: bool  # whether the guard lets these credentials through
    metadata: tuple[tuple[str, str | bytes], ...]
    target: int = 0  # which server of the RPC's kind (Facts.num_targets)
    requests: tuple = ()  # messages, or ...
    raw: tuple[bytes, ...] | None = None  # ... bytes sent as they are

    def payloads(self) -> list[bytes]:
        return list(self.raw) if self.raw is not None else [m.SerializeToString() for m in self.requests]

    def parsed(self) -> list:
        """The request messages as the server would parse them (raw bytes that do not parse: left out)."""
        if self.raw is None:
            return list(self.requests)
        cls = message_factory.GetMessageClass(self.rpc.input)
        out = []
        for b in self.raw:
            try:
                out.append(cls.FromString(b))
            except Exception:  # noqa: BLE001, S112 - protobuf's DecodeError (and friends): not a request
                continue
        return out

    def __repr__(self) -> str:
        if self.raw is not None:
            body = ", ".join(f"{len(b)} bytes {b[:48]!r}" for b in self.raw)
        else:
            body = " | ".join(_short(text_format.MessageToString(m, as_one_line=True)) for m in self.requests)
        return f"Case({self.rpc.name}, {self.credential}, target {self.target}: {body or '(nothing)'})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints falsifying examples so
        printer.text(repr(self))


def _short(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


_WRONG_SECRET = st.text(string.ascii_letters + string.digits + "-_", max_size=80)
_EXTRA_KEY = st.text(string.ascii_lowercase + string.digits + "-_.", min_size=1, max_size=12)
_EXTRA_BIN = st.binary(max_size=32)
_EXTRA_TEXT = st.text(string.printable.strip() + " ", max_size=40).map(str.strip)
_TWO_ORDERS = st.permutations([0, 1])  # which of two headers comes first
_EXTRA_COUNT = st.integers(0, 2)


class _Credentials:
    """The strategies ``_credentials`` draws from, built once per kind of secret (short repr: see _Parts)."""

    def __init__(self, kind: str, secrets: Secrets) -> None:
        self.kind, self.secrets = kind, secrets
        self.valid = valid = {"client": secrets.client, "node": secrets.node, "data": secrets.data}[kind]
        others = [s for k, s in (("client", secrets.client), ("node", secrets.node), ("data", secrets.data))
                  if k != kind and s]
        labels = ["valid"] * 7 + ["missing", "wrong", "other-kind", "malformed", "duplicate"]
        if kind == "data" and secrets.stale_data:
            labels.append("stale")
        self.labels = st.sampled_from(labels)
        self.wrong = st.one_of(st.sampled_from(["tfkey-made-up", "tfjoin-x", "tfdata-0", valid[:-1]]), _WRONG_SECRET)
        self.others = st.sampled_from(others)
        self.malformed = st.sampled_from([f"bearer {valid}", f"Bearer  {valid}", "Bearer ", "Bearer",
                                          f"Basic {valid}", valid, f"Bearer {valid}x", f"Bearer {valid[1:]}"])

    def __repr__(self) -> str:
        return f"<{self.kind} credentials>"


def credentials(kind: str, secrets: Secrets) -> st.SearchStrategy[tuple[str, bool, tuple]]:
    """(label, accepted, metadata): the valid secret of ``kind`` most of the time, else one of the ways it
    can be wrong; sometimes with unrelated metadata beside it."""
    return _credentials(_Credentials(kind, secrets))


@st.composite
def _credentials(draw: Callable, c: _Credentials) -> tuple[str, bool, tuple]:
    valid, secrets = c.valid, c.secrets
    label = draw(c.labels)
    wrong = "Bearer " + draw(c.wrong)
    # Every alternative is drawn whatever the label (as it always was: the cases stay those of a given seed).
    other, malformed, order = draw(c.others), draw(c.malformed), draw(_TWO_ORDERS)
    auth = {"valid": [f"Bearer {valid}"], "missing": [], "wrong": [wrong], "other-kind": [f"Bearer {other}"],
            "stale": [f"Bearer {secrets.stale_data}"], "malformed": [malformed],
            "duplicate": [[f"Bearer {valid}", wrong][i] for i in order]}[label]
    accepted = bool(auth) and auth[0] == f"Bearer {valid}"  # the first authorization header counts
    metadata = [("authorization", a) for a in auth]
    for _ in range(draw(_EXTRA_COUNT) if draw(_ONE_IN_5) == 0 else 0):
        key = "x-fuzz-" + draw(_EXTRA_KEY)
        if key.endswith("-bin"):
            metadata.append((key, draw(_EXTRA_BIN)))
        else:
            metadata.append((key, draw(_EXTRA_TEXT)))
    return label, accepted, tuple(metadata)


def cases(rpc: Rpc, facts: Facts, secrets: Secrets, *,
          accept: Callable[[Case], bool] | None = None) -> st.SearchStrategy[Case]:
    """What one call of ``rpc`` sends: a message (a stream of 0-4 for a streaming request) or raw bytes
    (a fifth of the time), with random credentials. ``accept`` filters out cases the caller must not send
    (e.g. a Leave naming a real node)."""
    hints = _hints(rpc.name, facts)
    return _cases(_Parts(rpc, facts, credentials(rpc.secret, secrets), request_messages(rpc, facts),
                         raw_payloads(rpc.input, hints), accept))


class _Parts:
    """What ``_cases`` draws from; its short repr keeps hypothesis from printing the strategies (tens of
    kB, at every rejected case). Not a dataclass: hypothesis would print its fields."""

    def __init__(self, rpc: Rpc, facts: Facts, creds: st.SearchStrategy, requests: st.SearchStrategy,
                 raws: st.SearchStrategy, accept: Callable | None) -> None:
        self.rpc, self.facts, self.creds, self.requests, self.raws, self.accept = (
            rpc, facts, creds, requests, raws, accept)
        self.targets = st.integers(0, max(facts.num_targets - 1, 0))

    def __repr__(self) -> str:
        return f"<{self.rpc.name} cases>"


_STREAM_LENGTHS = st.sampled_from([0, 1, 1, 1, 2, 3, 4])


@st.composite
def _cases(draw: Callable, parts: _Parts) -> Case:
    rpc = parts.rpc
    label, accepted, metadata = draw(parts.creds)
    target = draw(parts.targets)
    count = draw(_STREAM_LENGTHS) if rpc.request_streaming else 1
    if draw(_ONE_IN_5) == 0:
        case = Case(rpc, label, accepted, metadata, target, raw=tuple(draw(parts.raws) for _ in range(count)))
    else:
        case = Case(rpc, label, accepted, metadata, target,
                    requests=tuple(draw(parts.requests) for _ in range(count)))
    assume(parts.accept is None or parts.accept(case))
    return case


def known_cases(rpc: Rpc, facts: Facts, secrets: Secrets) -> list[Case]:
    """Cases that once got an improper answer (always run first: regressions)."""
    valid = {"client": secrets.client, "node": secrets.node, "data": secrets.data}[rpc.secret]
    metadata = (("authorization", f"Bearer {valid}"),)
    long = "x" * 1_000_000

    def case(*requests: Any) -> Case:
        return Case(rpc, "valid", True, metadata, 0, requests=requests)

    epoch = common_pb2.PlacementEpoch(value=facts.epoch)
    if rpc.name == "Forward":  # torch errors escaped as UNKNOWN (node/executor.py checks them now)
        def step(**seq: Any) -> Case:  # to stage 0
            return case(node_pb2.StepMessage(epoch=epoch, step_id=1, sequences=[node_pb2.SequenceStep(slot=0, **seq)]))

        return [step(token_ids=[-2**31]), step(token_ids=[facts.vocab_size]),  # the embedding's IndexError
                step(start=facts.max_seq_len - 1, token_ids=[1, 2])]  # a write past the KV cache
    # Status messages that quote the request, too long for a client to receive (RESOURCE_EXHAUSTED).
    if rpc.name == "Leave":
        return [case(coordinator_pb2.LeaveRequest(node=long))]
    if rpc.name == "FetchWeights":
        return [case(coordinator_pb2.FetchWeightsRequest(names=[long]))]
    if rpc.name == "LoadStage":
        return [case(node_pb2.LoadStageRequest(model=long)),
                case(node_pb2.LoadStageRequest(model="m", epoch=epoch, layers=common_pb2.LayerRange(end=1), num_slots=1,
                                               max_seq_len=1, local_ranks=[node_pb2.LocalRank()], codec=long))]
    return []


# --------------------------------------------------------------------------------------------- calls
@dataclass(frozen=True)
class Outcome:
    code: str  # "OK" or a grpc.StatusCode name
    details: str = ""
    responses: int = 0
    cut: bool = False  # the stream had more responses than were read (the call was cancelled then)
    note: str = ""  # what an OK answer says (a Forward's step errors, or that it computed)


def perform(channel: grpc.Channel, case: Case, *, timeout: float = 10.0, max_responses: int = 4) -> Outcome:
    """One call of ``case.rpc`` on ``channel``, its request bytes sent as they are; a response stream is
    read up to ``max_responses`` and then cancelled."""
    rpc, payloads = case.rpc, case.payloads()
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    method = kinds[(rpc.request_streaming, rpc.response_streaming)](rpc.path, request_serializer=None,
                                                                     response_deserializer=None)
    request = iter(payloads) if rpc.request_streaming else payloads[0]
    answers: list[bytes] = []
    try:
        if not rpc.response_streaming:
            answers.append(method(request, metadata=case.metadata, timeout=timeout))
            return Outcome("OK", responses=1, note=_note(rpc, answers))
        call = method(request, metadata=case.metadata, timeout=timeout)
        for answer in call:
            answers.append(answer)
            if len(answers) >= max_responses:
                call.cancel()
                return Outcome("OK", responses=len(answers), cut=True, note=_note(rpc, answers))
        return Outcome("OK", responses=len(answers), note=_note(rpc, answers))
    except grpc.RpcError as e:
        return Outcome(e.code().name, e.details() or "", len(answers))


def _note(rpc: Rpc, answers: list[bytes]) -> str:
    """For Forward, how deep the steps got: "computed" when some step gave tokens, else the first error."""
    if rpc.name != "Forward" or not answers:
        return ""
    results = [node_pb2.StepResult.FromString(a) for a in answers]
    errors = [r.error for r in results if r.error]
    if any(r.tokens for r in results):
        return "computed (and more)" if errors else "computed"
    return f"step error: {errors[0]}" if errors else "no step"


def improper(outcome: Outcome, case: Case) -> str | None:
    """Why ``outcome`` is not a proper answer to ``case`` (None when it is)."""
    code, details = outcome.code, outcome.details
    if code == "UNKNOWN":
        return f"UNKNOWN (an exception escaped the handler): {details}"
    if code == "INTERNAL":
        if case.raw is not None and case.accepted and details == DESERIALIZE_DETAILS:
            return None
        return f"INTERNAL: {details}"
    if code == "DEADLINE_EXCEEDED":
        return f"DEADLINE_EXCEEDED (a hang; valid requests are bounded): {details}"
    if code == "CANCELLED":
        return f"CANCELLED by the server: {details}"
    if code == "RESOURCE_EXHAUSTED" and "metadata size exceeds" in details:
        return f"the status is too long to reach the caller (does it quote the request?): {details}"
    if code == "UNAVAILABLE" and any(t in details.lower() for t in TRANSPORT_ERRORS):
        return f"UNAVAILABLE (the server went away?): {details}"
    refused = code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    if refused and case.accepted:
        return f"{code} with the valid credentials: {details}"
    if not refused and not case.accepted and code != "RESOURCE_EXHAUSTED":  # over the size limit: before the guard
        return f"{code} for a call with {case.credential} credentials: the guard should have refused it"
    return None


@dataclass
class Tally:
    """Outcome codes per RPC, and the improper ones with their cases."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (reason, repr(case))
    details: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (rpc, code, details[:80]) -> calls

    def add(self, case: Case, outcome: Outcome) -> str | None:
        per = self.counts.setdefault(case.rpc.name, {})
        key = outcome.code if outcome.code != "INTERNAL" or improper(outcome, case) else "INTERNAL(deserialize)"
        per[key] = per.get(key, 0) + 1
        what = (case.rpc.name, key, (outcome.details or outcome.note)[:80])
        self.details[what] = self.details.get(what, 0) + 1
        reason = improper(outcome, case)
        if reason is not None:
            self.problems.append((reason, repr(case)))
        return reason

    def common_details(self, rpc: str, n: int = 8) -> list[tuple[int, str, str]]:
        """The ``n`` most frequent (calls, code, details) of ``rpc``."""
        rows = [(count, code, details) for (r, code, details), count in self.details.items() if r == rpc]
        return sorted(rows, reverse=True)[:n]

    def table(self) -> str:
        codes = sorted({c for per in self.counts.values() for c in per}, key=lambda c: (c != "OK", c))
        width = max([len(r) for r in self.counts] + [3])
        head = f"{'rpc':<{width}}  " + "  ".join(f"{c:>{max(len(c), 6)}}" for c in codes)
        rows = [f"{rpc:<{width}}  " + "  ".join(f"{per.get(c, 0):>{max(len(c), 6)}}" for c in codes)
                for rpc, per in self.counts.items()]
        return "\n".join([head, *rows])


# ------------------------------------------------------------------------------------------- harness
MODEL = "llama-gqa-tied"
MAX_SEQ_LEN = 16  # every valid Generate ends within a few steps
COORDINATOR_ARGS = ["--stages", "2", "--slots", "2", "--max-seq-len", str(MAX_SEQ_LEN),
                    # a loaded 2-core machine must not miss heartbeats; junk members still go in 3 s
                    "--heartbeat-timeout-ms", "3000", "--capacity-wait", "30"]


def make_model(directory: Path) -> Path:
    """The model the fuzzing clusters serve: a random-init tiny Llama (tests/engine/reference.py) with a
    byte-level BPE tokenizer trained here to fit its vocabulary and a chat template, so that text prompts
    reach the tokenizer and the scheduler (a random model has no tokenizer of its own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.engine.reference import CONFIGS, make_random_model

    make_random_model(MODEL, directory)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    vocab = CONFIGS[MODEL][1]["vocab_size"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # short: prompts fit 16 tokens
    fast.save_pretrained(directory)
    return directory


def local_cluster(workdir: Path, *, nodes: int = 2):  # noqa: ANN201 - a coordinator.local_cluster.LocalCluster
    """A cluster to fuzz (not started): the fuzzing model as 2 stages on ``nodes`` CPU nodes."""
    from coordinator.local_cluster import LocalCluster, NodeSpec

    model = make_model(workdir / "model")
    specs = [NodeSpec(standby=False, devices="cpu", model_dir=str(model)) for _ in range(nodes)]
    return LocalCluster(workdir / "run", model=str(model), nodes=specs, coordinator_args=COORDINATOR_ARGS)


CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


class Harness:
    """Runs fuzz cases against a cluster: the facts and secrets the cases need, the servers of each RPC,
    and whether the cluster is still up and serving. ``procs``: the cluster's processes when it is local
    (LocalCluster.procs), checked after every case."""

    def __init__(self, address: str, *, api_key: str, join_token: str, procs: dict | None = None,
                 expected_exits: set | None = None, timeout: float = 10.0, http_url: str | None = None) -> None:
        self.address, self.api_key, self.join_token = address, api_key, join_token
        self.http_url = http_url  # the coordinator's HTTP API (tests/security/http_fuzz.py)
        self.procs, self.expected_exits = procs, expected_exits if expected_exits is not None else set()
        self.timeout = timeout
        self.channels: dict[str, grpc.Channel] = {}
        self.tally = Tally()
        self.real_nodes: tuple[str, ...] = ()
        self.node_devices = 1  # devices of the real nodes (the most of any)

    def channel(self, address: str) -> grpc.Channel:
        if address not in self.channels:
            self.channels[address] = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        return self.channels[address]

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.channels.clear()

    def status(self, timeout: float = 10.0) -> coordinator_pb2.StatusResponse:
        from client.credentials import bearer
        from tensorfleet.v1 import coordinator_pb2_grpc

        stub = coordinator_pb2_grpc.CoordinatorStub(self.channel(self.address))
        return stub.Status(coordinator_pb2.StatusRequest(), metadata=bearer(self.api_key), timeout=timeout)

    def setup(self, rpc: Rpc) -> tuple[Facts, Secrets, list[str]]:
        """What cases of ``rpc`` need now (re-read: a fuzzed Join or LoadStage may have re-placed the
        model): the cluster's facts, the secrets, and the addresses of the servers a case may target."""
        import json

        from node.security import data_key
        from tensorfleet.v1 import coordinator_pb2_grpc

        status = self.status()
        stub = coordinator_pb2_grpc.CoordinatorStub(self.channel(self.address))
        manifest = stub.GetManifest(coordinator_pb2.ManifestRequest(), metadata=_bearer(self.join_token),
                                    timeout=10)
        config = json.loads(manifest.config_json)
        real = [n for n in status.nodes if n.node_id in self.real_nodes]
        self.node_devices = max([len(n.info.devices) for n in real] + [1])
        addresses = {"Coordinator": [self.address], "Node": [n.info.address for n in real],
                     "Stage": [s.address for s in status.stages]}[rpc.service]
        epoch = status.epoch.value
        facts = Facts(vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
                      num_layers=int(config["num_hidden_layers"]), max_seq_len=MAX_SEQ_LEN,
                      num_slots=max([s.num_slots for s in status.stages] + [1]), epoch=epoch, model=status.model,
                      tensor_names=tuple(t.name for t in manifest.tensors),
                      node_names=tuple({x for n in real for x in (n.node_id, n.info.name)}),
                      num_targets=len(addresses))
        secrets = Secrets(client=self.api_key, node=self.join_token,
                          data=data_key(self.join_token, status.coordinator_run, epoch),
                          stale_data=data_key(self.join_token, status.coordinator_run, epoch - 1) if epoch > 1 else "")
        return facts, secrets, addresses

    def accept(self, rpc: Rpc, facts: Facts) -> Callable[[Case], bool] | None:
        """Which cases may be sent: never a Leave naming a real node (draining it is what Leave is for),
        nor a LoadStage with the join token that passes the node's checks (it would replace the running
        stage with a random one: the coordinator's right, and seconds of loading per case)."""
        if rpc.name == "Leave":
            names = set(facts.node_names)
            return lambda case: not any(m.node in names for m in case.parsed())
        if rpc.name == "LoadStage":
            devices = self.node_devices
            return lambda case: not (case.accepted and any(passes_load_checks(m, devices) for m in case.parsed()))
        return None

    def dead(self) -> list[str]:
        if self.procs is None:
            return []
        return [name for name, p in self.procs.items() if p.poll() is not None and name not in self.expected_exits]

    def check(self, case: Case, addresses: list[str]) -> tuple[Outcome, str | None]:
        """Perform ``case``; the outcome and what is wrong (an improper status, or a dead server)."""
        outcome = perform(self.channel(addresses[case.target]), case, timeout=self.timeout)
        reason = self.tally.add(case, outcome)
        dead = self.dead()
        if dead and reason is None:
            reason = f"process(es) died: {', '.join(dead)}"
            self.tally.problems.append((reason, repr(case)))
        return outcome, reason

    def wait_serving(self, timeout_s: float = 60.0) -> str:
        """Until a placement is in force and a short generation succeeds; '' then, else what was wrong
        last. Junk members that joined are gone by then too (they never heartbeat)."""
        import time

        from client.api import ClientError, TensorfleetClient

        deadline = time.monotonic() + timeout_s
        problem = "not checked"
        with TensorfleetClient(self.address, timeout=20, api_key=self.api_key,
                               channel=self.channel(self.address)) as client:
            while time.monotonic() < deadline:
                if self.dead():
                    return f"process(es) died: {', '.join(self.dead())}"
                try:
                    status = client.status()
                    if not self.real_nodes and status.stages:  # before any fuzzing: the real members
                        self.real_nodes = tuple(n.node_id for n in status.nodes)
                    junk = [n.node_id for n in status.nodes if n.node_id not in self.real_nodes]
                    if not status.stages:
                        problem = f"no placement: {status.unavailable_reason}"
                    elif junk:
                        problem = f"members that never heartbeat are still there: {junk}"
                    elif len(client.generate([1, 2, 3], max_tokens=2, ignore_eos=True).token_ids) != 2:
                        problem = "a generation did not give its 2 tokens"
                    else:
                        return ""
                except ClientError as e:
                    problem = str(e)
                time.sleep(0.5)
        return problem


def _bearer(secret: str) -> tuple:
    from client.credentials import bearer

    return bearer(secret)


def passes_load_checks(req: node_pb2.LoadStageRequest, devices: int = 1) -> bool:
    """Whether a node daemon with ``devices`` devices would act on ``req`` (stop its stage and load)."""
    from types import SimpleNamespace

    from node.daemon import NodeDaemon

    try:
        NodeDaemon._check_request(SimpleNamespace(devices=[None] * devices, name="fuzz"), req)  # noqa: SLF001
    except Exception:  # noqa: BLE001 - any refusal: the request is only checked, never loaded
        return False
    return True
