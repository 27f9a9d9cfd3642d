"""Link traffic counters: what the leader counts for each hidden-state message it packs (node/executor.py
pack_hidden, node/link.py TrafficCounters), and the control pipe that carries them to the daemon
(node/control.py against the executor's _control_loop, in threads)."""

from __future__ import annotations

import multiprocessing as mp
import threading
from types import SimpleNamespace

import torch

from engine.codecs import make_codec
from node.control import ControlPipe
from node.executor import _control_loop, pack_hidden
from node.link import TrafficCounters
from tensorfleet.v1 import coordinator_pb2, node_pb2


def test_exact_messages_count_the_tensor_bytes_as_raw_and_wire() -> None:
    out = torch.randn(5, 64, dtype=torch.bfloat16)  # [tokens, hidden]
    down = node_pb2.StepMessage()
    assert pack_hidden(down, out, None, key=3) == ("exact", 5 * 64 * 2, 5 * 64 * 2)
    assert down.HasField("hidden") and not down.HasField("encoded_hidden")


def test_encoded_messages_count_the_parts_as_wire_bytes() -> None:
    codec = make_codec("int8")
    out = torch.randn(16, 256)
    down = node_pb2.StepMessage()
    name, raw, wire = pack_hidden(down, out, codec, key=3)
    assert name == codec.spec and down.HasField("encoded_hidden")
    assert raw == 16 * 256 * 4
    assert wire == sum(len(p.data) for p in down.encoded_hidden.parts.values())
    assert 16 * 256 <= wire < raw / 3  # int8 values plus the scales


def test_counters_add_up_per_address_and_codec_and_build_link_traffic() -> None:
    traffic = TrafficCounters(stage_start=4, stage_end=8)
    assert traffic.snapshot() == []
    traffic.add("b:2", "exact", raw_bytes=100, wire_bytes=100)
    traffic.add("b:2", "int8", raw_bytes=400, wire_bytes=110)
    traffic.add("b:2", "exact", raw_bytes=50, wire_bytes=50)
    traffic.add("c:3", "exact", raw_bytes=7, wire_bytes=7)
    snap = traffic.snapshot()
    assert [(d["peer_address"], d["codec"], d["messages"], d["raw_bytes"], d["wire_bytes"]) for d in snap] == [
        ("b:2", "exact", 2, 150, 150), ("b:2", "int8", 1, 400, 110), ("c:3", "exact", 1, 7, 7)]
    link = coordinator_pb2.LinkTraffic(**snap[1])
    assert (link.stage_start, link.stage_end, link.wire_bytes) == (4, 8, 110)


def test_the_control_pipe_pairs_answers_with_requests_even_after_a_timeout() -> None:
    traffic = TrafficCounters(stage_start=0, stage_end=2)
    traffic.add("n:1", "exact", raw_bytes=10, wire_bytes=10)
    release = threading.Event()
    servicer = SimpleNamespace(traffic=traffic, configure=lambda *args: release.wait(5))
    daemon_end, leader_end = mp.Pipe()
    threading.Thread(target=_control_loop, args=(leader_end, servicer), daemon=True).start()
    pipe = ControlPipe(daemon_end)
    assert pipe.ask(("stats",), timeout_s=5) == ("stats", traffic.snapshot())
    assert pipe.ask(("configure", 7, "n:2", "key"), timeout_s=0.05) is None  # the executor is busy
    release.set()
    # The late ("configured", 7) is still in the pipe: it is dropped, not taken for this answer.
    assert pipe.ask(("stats",), timeout_s=5)[0] == "stats"
    assert pipe.ask(("reboot",), timeout_s=5) == ("unknown", "reboot")
    daemon_end.close()  # the loop ends on EOF
    assert pipe.ask(("stats",), timeout_s=0.1) is None  # a broken pipe answers None, never raises
