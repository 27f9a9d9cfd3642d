"""A stage's link to the next stage: its measured speed, and the policy that picks a codec for it.

``--codec`` (coordinator start) reaches every stage that sends hidden states on:

- ``exact`` (the default): nothing is compressed; outputs are bit-exact with a single process.
- ``SPEC`` (e.g. ``int8:rotate=true,outliers=3``): every message of at least ``--codec-min-tokens``
  tokens is encoded with SPEC, whatever the link (forced).
- ``auto`` or ``auto:SPEC``: per link, by measured bandwidth and message size. The stage measures its
  link when it (re)connects (``measure_link``: Stage.Probe payloads of two sizes, the fastest of a few
  tries each) and the codec's cost on its own device (``measure_cost``: the whole wire path of a small
  and a large message). A message of n tokens is encoded when n >= ``--codec-min-tokens`` and the
  transfer time the codec saves, ``n * (row_bytes - coded_row_bytes) / bandwidth``, exceeds the time
  it costs, ``fixed + n * per_row``. Both sides are linear in n, so this is one threshold per link:
  ``LinkPolicy.min_tokens``. Until the link is measured, nothing is compressed. SPEC defaults to
  ``AUTO_CODEC``, the most accurate codec measured (scripts/bench_codecs.py: 1.93x fewer bytes than
  bf16, 99.76% top-1 agreement on held-out text).

The cost model times the whole wire path on the sender's device (encode, proto, decode onto the
device) against the exact path; the receiver's device is taken to be like the sender's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from engine.codecs import Codec, make_codec
from engine.errors import ConfigError
from tensorfleet.v1 import node_pb2, node_pb2_grpc

AUTO_CODEC = "int8:rotate=true,outliers=3"
PROBE_SMALL_BYTES = 1 << 10
PROBE_SIZES = (1 << 18, 1 << 22)  # the large probe: 256 KiB, or 4 MiB when 256 KiB passes in < 20 ms
PROBE_FAST_S = 0.02
PROBE_TRIES = 3
COST_ROWS = 256


@dataclass(frozen=True)
class LinkMode:
    """What ``--codec`` asks for: ``mode`` is "exact", "force" or "auto"; ``spec`` the codec's spec."""

    mode: str
    spec: str = "exact"

    def __str__(self) -> str:
        return {"exact": "exact", "force": self.spec, "auto": f"auto:{self.spec}"}[self.mode]


def parse_link_codec(text: str) -> LinkMode:
    """"exact" | SPEC | "auto" | "auto:SPEC"; raises ConfigError naming what is wrong."""
    text = (text or "exact").strip()
    if text == "auto" or text.startswith("auto:"):
        spec = make_codec(text[len("auto:"):] if text.startswith("auto:") else AUTO_CODEC).spec
        if spec == "exact":
            raise ConfigError(f"--codec {text}: auto needs a compressing codec, not exact")
        return LinkMode("auto", spec)
    spec = make_codec(text).spec
    return LinkMode("exact") if spec == "exact" else LinkMode("force", spec)


@dataclass(frozen=True)
class LinkEstimate:
    bandwidth: float  # bytes per second
    latency_s: float  # round trip of a small probe

    def __str__(self) -> str:
        return f"{self.bandwidth * 8 / 1e6:.1f} Mbit/s, round trip {self.latency_s * 1e3:.2f} ms"


def _timed_probe(stub: node_pb2_grpc.StageStub, payload: bytes, timeout_s: float) -> float:
    t0 = time.perf_counter()
    reply = stub.Probe(node_pb2.ProbeRequest(payload=payload), timeout=timeout_s)
    took = time.perf_counter() - t0
    if reply.received_bytes != len(payload):
        raise RuntimeError(f"probe of {len(payload)} bytes arrived as {reply.received_bytes}")
    return took


def measure_link(address: str, *, secret: str | None = None, tls_dir: str | None = None,
                 timeout_s: float = 30.0) -> LinkEstimate:
    """Bandwidth and latency towards the Stage service at ``address``, from the fastest of
    ``PROBE_TRIES`` probes of a small and a large payload: bandwidth = size difference / time difference."""
    from node.security import open_channel, with_bearer
    from node.stream import CHANNEL_OPTIONS

    with open_channel(address, tls_dir, options=CHANNEL_OPTIONS) as channel:
        stub = node_pb2_grpc.StageStub(with_bearer(channel, secret))
        small = bytes(PROBE_SMALL_BYTES)
        _timed_probe(stub, small, timeout_s)  # connects
        t_small = min(_timed_probe(stub, small, timeout_s) for _ in range(PROBE_TRIES))
        for size in PROBE_SIZES:
            large = bytes(size)
            t_large = min(_timed_probe(stub, large, timeout_s) for _ in range(PROBE_TRIES))
            if t_large - t_small >= PROBE_FAST_S:
                break
    return LinkEstimate(bandwidth=(size - PROBE_SMALL_BYTES) / max(t_large - t_small, 1e-6), latency_s=t_small)


@dataclass(frozen=True)
class CodecCost:
    """A codec on one device and dtype: the time it adds to a message of n rows, ``fixed_s + n *
    per_row_s`` (per_row_s may be negative: fewer bytes to copy), and the bytes per row on the wire,
    exact and encoded (measured on a message of ``COST_ROWS`` rows)."""

    fixed_s: float
    per_row_s: float
    row_bytes: float
    coded_row_bytes: float


def measure_cost(codec: Codec, hidden: int, dtype: torch.dtype, device: torch.device | str) -> CodecCost:
    """What a codec adds to a message's trip through the wire code, beyond sending it exact: encode, to
    proto, serialize, parse, decode on the device, against the same for the plain tensor. Both paths
    are timed on this device for 1 and ``COST_ROWS`` rows (the fastest of 3 each) and fitted linearly."""
    from node.wire import decode_from_proto, encoded_to_proto, tensor_from_proto, tensor_to_proto
    from tensorfleet.v1 import common_pb2

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def coded(x: torch.Tensor) -> int:
        msg = encoded_to_proto(codec.encode(x, key=("cost", x.shape[0])))
        decode_from_proto(common_pb2.EncodedTensor.FromString(msg.SerializeToString()), device=device)
        return msg.ByteSize()

    def plain(x: torch.Tensor) -> int:
        msg = tensor_to_proto(x)
        tensor_from_proto(common_pb2.Tensor.FromString(msg.SerializeToString()), device=device)
        return msg.ByteSize()

    def timed(path, x: torch.Tensor) -> tuple[float, int]:  # noqa: ANN001
        path(x)  # warm-up
        best = float("inf")
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            size = path(x)
            sync()
            best = min(best, time.perf_counter() - t0)
        return best, size

    gen = torch.Generator().manual_seed(0)
    one = torch.randn(1, hidden, generator=gen).to(device=device, dtype=dtype)
    many = torch.randn(COST_ROWS, hidden, generator=gen).to(device=device, dtype=dtype)
    (c1, _), (cn, coded_bytes) = timed(coded, one), timed(coded, many)
    (p1, _), (pn, plain_bytes) = timed(plain, one), timed(plain, many)
    extra_1, extra_n = c1 - p1, cn - pn
    per_row = (extra_n - extra_1) / (COST_ROWS - 1)
    return CodecCost(fixed_s=max(extra_1 - per_row, 0.0), per_row_s=per_row,
                     row_bytes=plain_bytes / COST_ROWS, coded_row_bytes=coded_bytes / COST_ROWS)


class LinkPolicy:
    """Which codec, if any, encodes a message of n tokens on this link (see the module's docstring)."""

    def __init__(self, mode: LinkMode, *, min_tokens: int) -> None:
        self.mode = mode
        self.codec = make_codec(mode.spec) if mode.mode != "exact" else None
        self.floor = min_tokens
        self.link: LinkEstimate | None = None
        self.cost: CodecCost | None = None
        # force: the floor; auto: nothing until measured; exact: never.
        self.min_tokens: int | None = min_tokens if mode.mode == "force" else None

    def measured(self, link: LinkEstimate, cost: CodecCost) -> None:
        """Set the auto threshold from a link estimate and the codec's cost."""
        self.link, self.cost = link, cost
        if self.mode.mode != "auto":
            return
        saved_per_row = (cost.row_bytes - cost.coded_row_bytes) / link.bandwidth
        gain = saved_per_row - cost.per_row_s
        if gain <= 0:
            self.min_tokens = None
        else:
            self.min_tokens = max(self.floor, int(cost.fixed_s / gain) + 1)

    def forget_link(self) -> None:
        """A new next hop: in auto mode, nothing is compressed until its link is measured."""
        if self.mode.mode == "auto":
            self.link, self.min_tokens = None, None

    def choose(self, num_tokens: int) -> Codec | None:
        return self.codec if self.min_tokens is not None and num_tokens >= self.min_tokens else None

    def describe(self) -> str:
        what = ("never" if self.min_tokens is None else f"from {self.min_tokens} tokens")
        parts = [f"codec {self.mode}"]
        if self.link is not None:
            parts.append(f"link {self.link}")
        if self.cost is not None:
            parts.append(f"{self.cost.row_bytes / self.cost.coded_row_bytes:.2f}x fewer bytes, "
                         f"{self.cost.per_row_s * 1e6:.1f} us/row + {self.cost.fixed_s * 1e3:.2f} ms to code")
        return ", ".join(parts) + f": compress {what}"


class TrafficCounters:
    """Hidden states a stage leader sent downstream, per (next address, codec): messages, raw bytes (the
    exact encoding's size) and wire bytes (the tensor bytes put in the messages). Cumulative for the
    executor's life, across re-placements, so they read as Prometheus counters (LinkTraffic in
    coordinator.proto). Added to by the compute thread, read by the control thread."""

    def __init__(self, *, stage_start: int, stage_end: int) -> None:
        self.stage_start, self.stage_end = stage_start, stage_end
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], list[int]] = {}  # (address, codec) -> [messages, raw, wire]

    def add(self, address: str, codec: str, *, raw_bytes: int, wire_bytes: int) -> None:
        with self._lock:
            counts = self._counts.setdefault((address, codec), [0, 0, 0])
            counts[0] += 1
            counts[1] += raw_bytes
            counts[2] += wire_bytes

    def snapshot(self) -> list[dict]:
        """One dict per (address, codec), keyed like LinkTraffic's fields (``LinkTraffic(**d)`` builds one)."""
        with self._lock:
            items = sorted((key, list(counts)) for key, counts in self._counts.items())
        return [{"peer_address": address, "codec": codec, "stage_start": self.stage_start,
                 "stage_end": self.stage_end, "messages": messages, "raw_bytes": raw, "wire_bytes": wire}
                for (address, codec), (messages, raw, wire) in items]
