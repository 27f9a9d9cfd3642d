"""Prometheus metrics of the coordinator (prometheus-client), served at ``/metrics`` on its HTTP port.

Two kinds:
- request metrics, observed as requests run (``RequestTracker``, used by the gRPC and HTTP APIs alike):
  counts by outcome, tokens, and the histograms of time to first token, time per output token and
  end-to-end latency;
- state read at scrape time (``ClusterCollector``): queue depth, running sequences, KV slots, placement
  epoch and serving state, placement changes (failovers), heartbeat age per node, and what each node
  reports in its heartbeats: per-device memory, utilization, temperature and power (pynvml on the node)
  and the bytes its stages sent per link and codec.

Each coordinator has its own registry, so that several can live in one process (tests).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "tensorfleet"
# Latency buckets in seconds: from a fast GPU's token (ms) to a long CPU generation (minutes).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """The request metrics of one coordinator, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Requests that ended, by API and finish reason "
                                "(stop, length, cancelled, error).", ["api", "finish_reason"], registry=r)
        self.rejected = Counter(f"{PREFIX}_requests_rejected", "Requests refused before they ran, by API and "
                                "reason (invalid, unauthenticated, overloaded).", ["api", "reason"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of admitted requests.",
                                     ["api"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", ["api"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From arrival to the first generated "
                              "token.", ["api"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Mean time between generated tokens "
                              "after the first, per request.", ["api"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "From arrival to the last token.",
                             ["api"], buckets=E2E_BUCKETS, registry=r)

    def track(self, api: str, prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, api, prompt_tokens)

    def reject(self, api: str, reason: str) -> None:
        self.rejected.labels(api, reason).inc()


class RequestTracker:
    """Follows one admitted request: ``tokens(n)`` as its tokens arrive, ``end(reason)`` once."""

    def __init__(self, metrics: Metrics, api: str, prompt_tokens: int) -> None:
        self.metrics, self.api = metrics, api
        self.arrival = time.monotonic()
        self.first: float | None = None
        self.count = 0
        self.ended = False
        metrics.prompt_tokens.labels(api).inc(prompt_tokens)

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        if self.first is None:
            self.first = time.monotonic()
            self.metrics.ttft.labels(self.api).observe(self.first - self.arrival)
        self.count += n
        self.metrics.generation_tokens.labels(self.api).inc(n)

    def end(self, finish_reason: str) -> None:
        """Idempotent: the first outcome counts (a cancel after the last token changes nothing)."""
        if self.ended:
            return
        self.ended = True
        now = time.monotonic()
        m = self.metrics
        m.requests.labels(self.api, finish_reason).inc()
        if finish_reason in ("stop", "length"):
            m.e2e.labels(self.api).observe(now - self.arrival)
            if self.first is not None and self.count > 1:
                m.tpot.labels(self.api).observe((now - self.first) / (self.count - 1))


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


class ClusterCollector(Collector):
    """The coordinator's state, read when Prometheus scrapes."""

    def __init__(self, coordinator: Any) -> None:  # coordinator.server.Coordinator
        self.coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        c = self.coordinator
        load = c.scheduler.load()
        yield _single("requests_waiting", "Requests in the queue, waiting for a KV slot.", load.waiting)
        yield _single("requests_running", "Sequences holding a KV slot (running).", load.running)
        yield _single("kv_slots", "KV cache slots of the current placement (batch capacity).", load.slots)
        yield _single("kv_slots_used", "KV cache slots in use.", load.slots - load.slots_free)
        yield _single("kv_slot_usage_ratio", "Share of the KV cache slots in use.",
                      (load.slots - load.slots_free) / load.slots if load.slots else 0.0)
        yield _single("steps_in_flight", "Batch steps in the pipeline now.", load.steps_in_flight)
        yield _single("placement_epoch", "The placement epoch (bumped by every re-placement).", c.placer.epoch)
        yield _single("serving", "1 while a complete placement serves requests, else 0.", 1 if c.serving else 0)
        yield from self._membership(c.placer.membership)

    def _membership(self, membership: Any) -> Iterator[Metric]:  # coordinator.membership.Membership
        now = membership.clock()
        members = membership.snapshot()
        with membership.lock:
            kinds = Tally(change.kind for change in membership.changes)
        changes = CounterMetricFamily(f"{PREFIX}_placement_changes", "Re-placements, by kind (failure: a "
                                      "failover; drain; rebalance).", labels=["kind"])
        for kind in ("failure", "drain", "rebalance"):
            changes.add_metric([kind], kinds.get(kind, 0))
        yield changes
        age = _gauge("node_heartbeat_age_seconds", "Seconds since each node's last heartbeat.", ["node", "name"])
        for m in members:
            age.add_metric([m.node_id, m.info.name], now - m.last_seen)
        yield age
        yield _single("nodes", "Nodes that are members of the cluster.", len(members))
        yield from device_metrics(members)
        yield from link_metrics(members)


def _single(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = _gauge(name, doc)
    family.add_metric([], value)
    return family


DEVICE_LABELS = ["node", "device", "kind", "name"]


def device_metrics(members: list) -> Iterator[Metric]:
    """Per-device gauges from the latest heartbeat of each node (its join report until one arrives)."""
    total = _gauge("device_memory_total_bytes", "Device memory.", DEVICE_LABELS)
    free = _gauge("device_memory_free_bytes", "Free device memory (host memory for CPU devices).", DEVICE_LABELS)
    used = _gauge("device_memory_used_bytes", "Device memory in use (NVML; includes the driver's reserve).",
                  DEVICE_LABELS)
    util = _gauge("device_utilization_percent", "GPU utilization (NVML) over its last sample period.",
                  DEVICE_LABELS)
    temp = _gauge("device_temperature_celsius", "GPU temperature (NVML).", DEVICE_LABELS)
    power = _gauge("device_power_watts", "GPU power draw (NVML).", DEVICE_LABELS)
    for m in members:
        devices = getattr(m, "live_devices", None) or m.info.devices
        for d in devices:
            labels = [m.node_id, f"{_kind_name(d.kind)}:{d.ordinal}", _kind_name(d.kind), d.name]
            total.add_metric(labels, d.total_memory_bytes)
            free.add_metric(labels, d.free_memory_bytes)
            for family, field in ((used, "used_memory_bytes"), (util, "utilization_percent"),
                                  (temp, "temperature_celsius"), (power, "power_watts")):
                if _has(d, field):
                    family.add_metric(labels, getattr(d, field))
    yield from (total, free, used, util, temp, power)


def link_metrics(members: list) -> Iterator[Metric]:
    """Hidden-state traffic each node's stages sent to the next stage, by link and codec."""
    labels = ["node", "stage", "peer", "codec"]
    raw = CounterMetricFamily(f"{PREFIX}_link_raw_bytes", "Hidden-state bytes before coding (what exact "
                              "exchange would send).", labels=labels)
    wire = CounterMetricFamily(f"{PREFIX}_link_wire_bytes", "Hidden-state bytes sent on the link after "
                               "coding.", labels=labels)
    messages = CounterMetricFamily(f"{PREFIX}_link_messages", "Hidden-state messages sent.", labels=labels)
    for m in members:
        for link in getattr(m, "links", None) or ():
            key = [m.node_id, f"{link.stage_start}-{link.stage_end}", link.peer_address, link.codec]
            raw.add_metric(key, link.raw_bytes)
            wire.add_metric(key, link.wire_bytes)
            messages.add_metric(key, link.messages)
    yield from (raw, wire, messages)


def _kind_name(kind: int) -> str:
    from tensorfleet.v1 import common_pb2

    name = common_pb2.DeviceKind.Name(kind) if kind in common_pb2.DeviceKind.values() else str(kind)
    return name.removeprefix("DEVICE_KIND_").lower()


def _has(message: Any, field: str) -> bool:
    """Whether an optional proto field is set (absent in older messages or where NVML had no value)."""
    try:
        return message.HasField(field)
    except ValueError:  # not an optional field of this message (an older proto)
        return False
