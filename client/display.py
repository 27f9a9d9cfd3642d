"""A cluster's StatusResponse as a dict (the protobuf JSON mapping) or as readable tables (``format_table``:
plain-text columns, no dependency)."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from google.protobuf import json_format

from tensorfleet.v1 import common_pb2, coordinator_pb2

_GIB = float(1 << 30)


def status_to_dict(status: coordinator_pb2.StatusResponse) -> dict[str, Any]:
    """The protobuf JSON mapping of ``status`` with the .proto's field names and every field present
    (zeros included). As that mapping says, 64-bit integers (epoch, byte counts) are strings."""
    return json_format.MessageToDict(
        status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def status_to_json(status: coordinator_pb2.StatusResponse) -> str:
    """``status_to_dict`` as indented JSON text."""
    return json_format.MessageToJson(
        status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=2
    )


def format_status(status: coordinator_pb2.StatusResponse) -> str:
    """Readable text: a summary (model, epoch, serving or why not, load), then tables of the nodes, the
    stages and the recent placement changes."""
    sections = [_summary(status), _nodes(status), _stages(status)]
    if status.placement_changes:
        sections.append(_changes(status))
    return "\n\n".join("\n".join(lines) for lines in sections)


def _summary(s: coordinator_pb2.StatusResponse) -> list[str]:
    epoch = str(s.epoch.value) if s.HasField("epoch") and s.epoch.value else "none"
    if s.coordinator_run:
        epoch += f" (coordinator run {s.coordinator_run})"
    if s.unavailable_reason:
        serving = f"no: {s.unavailable_reason}"
    elif s.stages:
        hosts = len({m.node_id for st in s.stages for m in st.members})
        serving = f"yes, {len(s.stages)} stage(s) on {hosts} node(s)"
    else:
        serving = "no: no placement in force"
    queue = f" (the queue holds up to {s.max_queue})" if s.max_queue else ""
    fields = [("model", s.model or "(none)"), ("epoch", epoch), ("serving", serving),
              ("requests", f"{s.requests_running} running, {s.requests_waiting} waiting{queue}")]
    if s.max_batch_size:
        fields.append(("slots", f"{s.slots_free} free of {s.max_batch_size} ({s.max_step_tokens} tokens per step, "
                                f"{s.micro_batches} micro-batch(es) in flight)"))
    width = max(len(key) for key, _ in fields)
    return [f"{key:<{width}}  {value}" for key, value in fields]


def _nodes(s: coordinator_pb2.StatusResponse) -> list[str]:
    if not s.nodes:
        return ["nodes: none joined"]
    states = [_enum_name(coordinator_pb2.NodeState, n.state, "NODE_STATE_") for n in s.nodes]
    counts = ", ".join(f"{states.count(x)} {x}" for x in dict.fromkeys(states))
    rows = []
    for n, state in zip(s.nodes, states, strict=True):
        node = [n.node_id, n.info.name or "-", n.info.address or "-", state, _age(n.last_heartbeat_age_s)]
        devices = [[_device(d), _memory(d)] for d in n.info.devices] or [["-", "-"]]
        rows.append(node + devices[0])
        rows += [[""] * len(node) + d for d in devices[1:]]  # one line per device, the node's cells once
    headers = ["ID", "NAME", "ADDRESS", "STATE", "HEARTBEAT", "DEVICE", "FREE/TOTAL MEMORY"]
    return [f"nodes ({len(s.nodes)}: {counts})", *format_table(headers, rows, right={4, 6})]


def _stages(s: coordinator_pb2.StatusResponse) -> list[str]:
    if not s.stages:
        return ["stages: none (no placement in force)"]
    rows = [
        [
            str(st.index),
            _layers(st.layers),
            str(len(st.members)),
            " ".join(f"{m.node_id}:{m.device_index}" for m in st.members) or "-",
            st.address or "-",
            f"{st.weight_bytes / _GIB:.2f} GiB",
            f"{st.kv_cache_bytes / _GIB:.2f} GiB",
            str(st.num_slots),
            str(st.slots_fit) if st.slots_fit else "-",
        ]
        for st in s.stages
    ]
    headers = ["STAGE", "LAYERS", "TP", "DEVICES (node:device, by rank)", "LEADER", "WEIGHTS", "KV CACHE", "SLOTS",
               "SLOTS FIT"]
    return [f"stages ({len(s.stages)})", *format_table(headers, rows, right={2, 5, 6, 7, 8})]


def _changes(s: coordinator_pb2.StatusResponse) -> list[str]:
    rows = [
        [
            str(c.epoch.value) if c.epoch.value else "-",
            time.strftime("%H:%M:%S", time.localtime(c.detected_at)) if c.detected_at else "-",
            c.kind or "-",
            ", ".join(c.nodes) or "-",
            f"{c.resumed_at - c.detected_at:.2f} s" if c.resumed_at else "not resumed",
            str(c.requests_replayed),
            str(c.layers_moved),
            c.reason,
        ]
        for c in s.placement_changes
    ]
    headers = ["EPOCH", "AT", "KIND", "NODES", "PAUSED", "REPLAYED", "LAYERS MOVED", "REASON"]
    return ["placement changes (latest last)", *format_table(headers, rows, right={4, 5, 6})]


def format_table(headers: list[str], rows: list[list[str]], *, right: Collection[int] = ()) -> list[str]:
    """Lines of a plain-text table, indented two spaces: columns two spaces apart, each as wide as its
    widest cell, numbers (the ``right`` columns) right-aligned so their digits line up."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    out = []
    for row in [headers, *rows]:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s ago"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s ago"
    return f"{minutes // 60} h {minutes % 60} min ago"


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:  # a newer server's value
        return f"unknown({value})"


def _device(d: common_pb2.DeviceInfo) -> str:
    kind = _enum_name(common_pb2.DeviceKind, d.kind, "DEVICE_KIND_")
    return f"{kind}:{d.ordinal} {d.name}" if d.name else f"{kind}:{d.ordinal}"


def _memory(d: common_pb2.DeviceInfo) -> str:
    return f"{d.free_memory_bytes / _GIB:.1f}/{d.total_memory_bytes / _GIB:.1f} GiB"


def _layers(r: common_pb2.LayerRange) -> str:
    # The range is half-open [start, end); people read "0-11 (12)" more easily than "[0, 12)".
    if r.end <= r.start:
        return "none"
    return f"{r.start}-{r.end - 1} ({r.end - r.start})"
