"""client.display: ``tensorfleet status`` as aligned plain-text tables, from a hand-built StatusResponse."""

from __future__ import annotations

from client.display import format_status, format_table
from tensorfleet.v1 import common_pb2, coordinator_pb2

GIB = 1 << 30


def _status() -> coordinator_pb2.StatusResponse:
    gpu = dict(kind=common_pb2.DEVICE_KIND_CUDA, name="NVIDIA A10", total_memory_bytes=24 * GIB)
    status = coordinator_pb2.StatusResponse(
        epoch=common_pb2.PlacementEpoch(value=7), model="Qwen2.5-7B", coordinator_run="c0ffee",
        requests_running=3, requests_waiting=12, max_batch_size=16, slots_free=13, max_step_tokens=512,
        micro_batches=2, max_queue=256,
    )
    big = status.nodes.add(node_id="node-long-id-1", state=coordinator_pb2.NODE_STATE_SERVING, last_heartbeat_age_s=0.4)
    big.info.name, big.info.address = "gpu-box", "10.1.2.3:7001"
    big.info.devices.add(index=0, ordinal=0, free_memory_bytes=20 * GIB, **gpu)
    big.info.devices.add(index=1, ordinal=1, free_memory_bytes=3 * GIB, **gpu)
    cpu = status.nodes.add(node_id="n2", state=coordinator_pb2.NODE_STATE_FAILED, last_heartbeat_age_s=125.0)
    cpu.info.name, cpu.info.address = "laptop", "10.1.2.4:7001"
    cpu.info.devices.add(kind=common_pb2.DEVICE_KIND_CPU, index=0, total_memory_bytes=16 * GIB,
                         free_memory_bytes=GIB // 2)
    stage = status.stages.add(index=0, layers={"start": 0, "end": 28}, address="10.1.2.3:7001",
                              weight_bytes=14 * GIB, kv_cache_bytes=2 * GIB, num_slots=16, slots_fit=40)
    stage.members.add(node_id="node-long-id-1", device_index=0, tp_rank=0)
    stage.members.add(node_id="node-long-id-1", device_index=1, tp_rank=1)
    status.placement_changes.add(epoch={"value": 7}, kind="failure", nodes=["n2"], reason="n2: no heartbeat for 3 s",
                                 detected_at=1000.0, resumed_at=1004.5, requests_replayed=5, layers_moved=9)
    return status


def _table(text: str, title: str) -> list[str]:
    """The header and row lines of the table under ``title``."""
    lines = text.split(title, 1)[1].split("\n\n", 1)[0].splitlines()
    return lines[1:]


def _column(header: str, name: str) -> int:
    return header.index(name)


def test_summary_says_what_serves_and_the_load() -> None:
    text = format_status(_status())
    head = text.split("\n\n", 1)[0].splitlines()
    assert head == [
        "model     Qwen2.5-7B",
        "epoch     7 (coordinator run c0ffee)",
        "serving   yes, 1 stage(s) on 1 node(s)",
        "requests  3 running, 12 waiting (the queue holds up to 256)",
        "slots     13 free of 16 (512 tokens per step, 2 micro-batch(es) in flight)",
    ]


def test_node_columns_line_up() -> None:
    text = format_status(_status())
    assert "nodes (2: 1 serving, 1 failed)" in text
    header, *rows = _table(text, "nodes (2: 1 serving, 1 failed)")
    assert len(rows) == 3  # one line per device: two for the GPU box, one for the laptop
    for name, values in (("ID", ["node-long-id-1", "", "n2"]), ("STATE", ["serving", "", "failed"]),
                         ("DEVICE", ["cuda:0 NVIDIA A10", "cuda:1 NVIDIA A10", "cpu:0"])):
        at = _column(header, name)
        for row, value in zip(rows, values, strict=True):  # left-aligned: each value starts under its header
            assert row[at:at + len(value)] == value and (at == 0 or row[at - 1] == " "), (name, row)
    end = _column(header, "FREE/TOTAL MEMORY") + len("FREE/TOTAL MEMORY")
    assert [row[:end][-len(m):] for row, m in zip(rows, ["20.0/24.0 GiB", "3.0/24.0 GiB", "0.5/16.0 GiB"],
                                                   strict=True)] == ["20.0/24.0 GiB", "3.0/24.0 GiB", "0.5/16.0 GiB"]
    assert all(len(row) == end for row in rows)  # right-aligned: they all end under the header's end
    assert "2 min 5 s ago" in rows[2] and "0.4 s ago" in rows[0]


def test_stage_columns_line_up() -> None:
    header, row = _table(format_status(_status()), "stages (1)")
    assert row.split() == ["0", "0-27", "(28)", "2", "node-long-id-1:0", "node-long-id-1:1", "10.1.2.3:7001",
                           "14.00", "GiB", "2.00", "GiB", "16", "40"]
    tp = _column(header, "TP") + len("TP")
    assert row[tp - 1] == "2" and row[tp] == " "  # the tp size, right-aligned under its header
    devices = _column(header, "DEVICES")
    assert row[devices:].startswith("node-long-id-1:0 node-long-id-1:1")
    assert len(row) == len(header)  # the last column (SLOTS FIT) is right-aligned: both end together


def test_placement_changes_and_an_unavailable_cluster() -> None:
    status = _status()
    status.unavailable_reason = "the nodes left hold 12.0 GiB; the model needs 16.0 GiB"
    del status.stages[:]
    text = format_status(status)
    assert "serving   no: the nodes left hold 12.0 GiB; the model needs 16.0 GiB" in text
    assert "stages: none (no placement in force)" in text
    header, row = _table(text, "placement changes (latest last)")
    assert row.split()[:3] == ["7", row.split()[1], "failure"] and "4.50 s" in row
    assert row[_column(header, "REASON"):] == "n2: no heartbeat for 3 s"


def test_format_table_widths_and_alignment() -> None:
    lines = format_table(["NAME", "N"], [["a", "1"], ["longer", "100"]], right={1})
    assert lines == ["  NAME      N", "  a         1", "  longer  100"]
