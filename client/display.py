"""A cluster's StatusResponse as a dict (the protobuf JSON mapping) or as readable tables."""

from __future__ import annotations

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
    """Readable text: the model and epoch, a table of nodes, a table of stages, the request counts."""
    epoch = str(status.epoch.value) if status.HasField("epoch") and status.epoch.value else "none"
    lines = [f"model: {status.model or '(none)'}", f"placement epoch: {epoch}", ""]

    if status.nodes:
        lines.append(f"nodes ({len(status.nodes)}):")
        rows = [
            [
                n.node_id,
                n.info.name,
                n.info.address,
                _enum_name(coordinator_pb2.NodeState, n.state, "NODE_STATE_"),
                f"{n.last_heartbeat_age_s:.1f} s ago",
                "; ".join(_device(d) for d in n.info.devices) or "-",
            ]
            for n in status.nodes
        ]
        lines += _table(["NODE", "NAME", "ADDRESS", "STATE", "HEARTBEAT", "DEVICES (free/total)"], rows)
    else:
        lines.append("nodes: none joined")
    lines.append("")

    if status.stages:
        lines.append(f"placement ({len(status.stages)} stages):")
        rows = [
            [
                str(s.index),
                _layers(s.layers),
                " ".join(f"{m.node_id}:{m.device_index}/{m.tp_rank}" for m in s.members) or "-",
                s.address or "-",
                f"{s.weight_bytes / _GIB:.2f}",
                f"{s.kv_cache_bytes / _GIB:.2f}",
                str(s.num_slots),
                str(s.slots_fit) if s.slots_fit else "-",
            ]
            for s in status.stages
        ]
        headers = ["STAGE", "LAYERS", "MEMBERS (node:device/rank)", "ADDRESS", "WEIGHTS GiB", "KV GiB", "SLOTS",
                   "MEMORY FITS"]
        lines += _table(headers, rows)
    else:
        lines.append("placement: none in force" + (f" ({status.unavailable_reason})" if status.unavailable_reason
                                                   else ""))
    lines.append("")

    if status.placement_changes:
        lines.append("placement changes (latest last):")
        rows = [
            [
                str(c.epoch.value) if c.epoch.value else "-",
                c.kind,
                ", ".join(c.nodes) or "-",
                f"{c.resumed_at - c.detected_at:.2f} s" if c.resumed_at else "not yet",
                str(c.requests_replayed),
                str(c.layers_moved),
                c.reason,
            ]
            for c in status.placement_changes
        ]
        lines += _table(["EPOCH", "KIND", "NODES", "PAUSED", "REPLAYED", "LAYERS MOVED", "REASON"], rows)
        lines.append("")

    if status.max_batch_size:
        lines.append(f"batch: up to {status.max_batch_size} sequences ({status.slots_free} slots free), "
                     f"{status.max_step_tokens} tokens per step, {status.micro_batches} micro-batch(es) in flight, "
                     f"queue up to {status.max_queue}")
    lines.append(f"requests: {status.requests_running} running, {status.requests_waiting} waiting")
    return "\n".join(lines)


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:  # a newer server's value
        return f"unknown({value})"


def _device(d: common_pb2.DeviceInfo) -> str:
    kind = _enum_name(common_pb2.DeviceKind, d.kind, "DEVICE_KIND_")
    memory = f"{d.free_memory_bytes / _GIB:.1f}/{d.total_memory_bytes / _GIB:.1f} GiB"
    return f"{kind}:{d.ordinal} {d.name} {memory}" if d.name else f"{kind}:{d.ordinal} {memory}"


def _layers(r: common_pb2.LayerRange) -> str:
    # The range is half-open [start, end); people read "0-11 (12)" more easily than "[0, 12)".
    if r.end <= r.start:
        return "none"
    return f"{r.start}-{r.end - 1} ({r.end - r.start})"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    out = []
    for row in [headers, *rows]:
        out.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return out
