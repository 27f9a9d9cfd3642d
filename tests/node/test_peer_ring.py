"""Step rings shared by two processes of one machine (node/peer_ring.py): a CPU file ring here, and a CUDA
IPC ring on the GPU machine; mappings that cannot be trusted are refused."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent import futures

import pytest
import torch

from node.peer_ring import ReceivedRings, RingLink, SharedRing, device_id, host_id
from node.wire import WireError
from tensorfleet.v1 import common_pb2, node_pb2

HIDDEN = 8


def _downstream(offer: bytes, device: str, steps: int, conn) -> None:  # noqa: ANN001 - a multiprocessing Connection
    """The next stage's side, in another process: accept the ring, then for each step read the hidden
    states from the slot and answer with tokens = their row sums (as int64) in the token ring."""
    try:
        rings = ReceivedRings(torch.device(device), is_last=True)
        answer = rings.accept(node_pb2.ShareRequest.FromString(offer), hidden_size=HIDDEN)
        conn.send_bytes(answer.SerializeToString())
        for _ in range(steps):
            slot = node_pb2.SharedSlot.FromString(receive(conn))
            x = rings.hidden(slot)
            tokens = x.float().sum(dim=1).round().long()
            conn.send_bytes(rings.put_tokens(slot, tokens).SerializeToString())
    except BaseException as e:  # noqa: BLE001 - reported to the test
        conn.send_bytes(f"error: {e!r}".encode())


def receive(conn) -> bytes:  # noqa: ANN001
    if not conn.poll(60):
        raise AssertionError("no message from the other process in 60 s")
    msg = conn.recv_bytes()
    if msg.startswith(b"error:"):
        raise AssertionError(msg.decode())
    return msg


def run_two_processes(device: str, dtype: torch.dtype) -> None:
    dev = torch.device(device)
    hidden = SharedRing.allocate((4, 3, HIDDEN), dtype, dev)
    offer = node_pb2.ShareRequest(epoch=common_pb2.PlacementEpoch(value=1), ring_id=7, host_id=host_id(),
                                  device_id=device_id(dev), hidden=hidden.export())
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    steps = 6  # more than the ring's slots: slots are reused once released
    child = ctx.Process(target=_downstream, args=(offer.SerializeToString(), device, steps, child_conn))
    child.start()
    link = None
    try:
        answer = node_pb2.ShareResponse.FromString(receive(conn))
        assert answer.accepted, answer.reason
        link = RingLink(7, hidden, SharedRing.open(answer.tokens, dev))
        for step in range(1, steps + 1):
            rows = 1 + step % 3
            out = torch.arange(rows * HIDDEN, dtype=torch.float32, device=dev).view(rows, HIDDEN).to(dtype) + step
            slot = link.send(step, out)
            conn.send_bytes(slot.SerializeToString())
            got = node_pb2.SharedSlot.FromString(receive(conn))
            link.check_answer(slot, got, rows)
            expected = out.float().sum(dim=1).round().long().tolist()
            device_tokens = link.slot_tokens(got.index, got.rows, step)
            assert device_tokens is not None and device_tokens.tolist() == expected
            assert link.host_tokens(got.index, got.rows) == expected
            link.release(slot.index)
        child.join(60)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        (link or hidden).close()


def test_a_cpu_ring_carries_hidden_states_and_tokens_between_processes() -> None:
    run_two_processes("cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_ipc_ring_carries_hidden_states_and_tokens_between_processes() -> None:
    run_two_processes("cuda:0", torch.bfloat16)


def test_the_ring_file_is_gone_once_both_sides_mapped_it() -> None:
    ring = SharedRing.allocate((2, 2, HIDDEN), torch.float32, torch.device("cpu"))
    msg = ring.export()
    assert os.path.exists(msg.path)
    other = SharedRing.open(msg, torch.device("cpu"))
    assert not os.path.exists(msg.path)
    ring.buffer[1, 1, 3] = 42.0
    assert other.buffer[1, 1, 3].item() == 42.0  # the same memory
    ring.close()  # the name is gone already: no error


def test_an_offer_from_another_machine_or_device_is_refused() -> None:
    ring = SharedRing.allocate((2, 2, HIDDEN), torch.float32, torch.device("cpu"))
    rings = ReceivedRings(torch.device("cpu"), is_last=False)
    try:
        base = dict(ring_id=1, hidden=ring.export())
        answer = rings.accept(node_pb2.ShareRequest(host_id="elsewhere", device_id="cpu", **base), hidden_size=HIDDEN)
        assert not answer.accepted and "another machine" in answer.reason
        answer = rings.accept(node_pb2.ShareRequest(host_id=host_id(), device_id="cuda:GPU-x", **base),
                              hidden_size=HIDDEN)
        assert not answer.accepted and "cuda:GPU-x" in answer.reason
        answer = rings.accept(node_pb2.ShareRequest(host_id=host_id(), device_id="cpu", **base), hidden_size=HIDDEN + 1)
        assert not answer.accepted and "hidden size" in answer.reason
    finally:
        ring.close()


def test_mappings_that_do_not_check_out_are_refused(tmp_path) -> None:  # noqa: ANN001
    ring = SharedRing.allocate((2, 2, HIDDEN), torch.float32, torch.device("cpu"))
    try:
        msg = ring.export()
        wrong_size = node_pb2.SharedBuffer()
        wrong_size.CopyFrom(msg)
        wrong_size.shape[:] = [2, 2, HIDDEN * 2]
        with pytest.raises(WireError, match="holds"):
            SharedRing.open(wrong_size, torch.device("cpu"))
        elsewhere = node_pb2.SharedBuffer()
        elsewhere.CopyFrom(msg)
        elsewhere.path = str(tmp_path / os.path.basename(msg.path))
        with pytest.raises(WireError, match="not a ring file"):
            SharedRing.open(elsewhere, torch.device("cpu"))
        forged = node_pb2.SharedBuffer()
        forged.CopyFrom(msg)
        forged.check_values[:] = [1.0, 2.0, 3.0, 4.0]
        with pytest.raises(WireError, match="owner wrote"):
            SharedRing.open(forged, torch.device("cpu"))
        with pytest.raises(WireError, match="cannot be mapped"):
            SharedRing.open(node_pb2.SharedBuffer(kind="cuda_ipc", shape=[2, 2], dtype=msg.dtype), torch.device("cpu"))
    finally:
        ring.close()


def test_a_step_naming_a_slot_outside_the_ring_is_refused() -> None:
    ring = SharedRing.allocate((2, 2, HIDDEN), torch.float32, torch.device("cpu"))
    rings = ReceivedRings(torch.device("cpu"), is_last=True)
    try:
        offer = node_pb2.ShareRequest(ring_id=5, host_id=host_id(), device_id="cpu", hidden=ring.export())
        answer = rings.accept(offer, hidden_size=HIDDEN)
        assert answer.accepted and answer.HasField("tokens")
        for bad in (node_pb2.SharedSlot(ring_id=6, index=0, rows=1), node_pb2.SharedSlot(ring_id=5, index=2, rows=1),
                    node_pb2.SharedSlot(ring_id=5, index=0, rows=3), node_pb2.SharedSlot(ring_id=5, index=0, rows=0)):
            with pytest.raises(WireError):
                rings.hidden(bad)
        SharedRing.open(answer.tokens, torch.device("cpu")).close()
    finally:
        ring.close()
        rings.clear()


def test_a_slot_is_not_reused_before_its_step_is_released(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden = SharedRing.allocate((2, 1, HIDDEN), torch.float32, torch.device("cpu"))
    link = RingLink(1, hidden, None)
    try:
        link.send(1, torch.zeros(1, HIDDEN))
        link.send(2, torch.zeros(1, HIDDEN))
        monkeypatch.setattr("node.peer_ring.RING_WAIT_S", 0.05)
        with pytest.raises(RuntimeError, match="still holds step 1"):
            link.send(3, torch.zeros(1, HIDDEN))
        link.release(0)
        assert link.send(4, torch.ones(1, HIDDEN)).index == 0
        assert link.slot_tokens(0, 1, 4) is None  # no token ring: the next stage is not the last
    finally:
        link.close()


class FakeStream:
    """Stands in for node/stream.py's StageStream: the test answers each submitted step by hand."""

    def __init__(self) -> None:
        self.sent: list[tuple[node_pb2.StepMessage, futures.Future]] = []

    def submit(self, msg: node_pb2.StepMessage) -> futures.Future:
        done: futures.Future = futures.Future()
        self.sent.append((msg, done))
        return done


def _linked_pair() -> tuple[RingLink, ReceivedRings]:
    """A CPU ring between two ends in this process: the link (upstream) and the last stage's rings."""
    dev = torch.device("cpu")
    hidden = SharedRing.allocate((4, 3, HIDDEN), torch.float32, dev)
    rings = ReceivedRings(dev, is_last=True)
    answer = rings.accept(node_pb2.ShareRequest(ring_id=9, host_id=host_id(), device_id="cpu", hidden=hidden.export()),
                          hidden_size=HIDDEN)
    assert answer.accepted, answer.reason
    return RingLink(9, hidden, SharedRing.open(answer.tokens, dev)), rings


def _step(step_id: int, slots: list[int]) -> node_pb2.StepMessage:
    msg = node_pb2.StepMessage(step_id=step_id)
    for s in slots:
        msg.sequences.add(request_id=f"r{s}", slot=s, start=5)
    return msg


def test_forward_brings_the_tokens_home_and_keeps_them_on_the_device_for_rows_sent_ahead() -> None:
    link, rings = _linked_pair()
    stream = FakeStream()
    try:
        out = torch.randn(2, HIDDEN)
        final = link.forward(stream, _step(11, [3, 1]), out, keep=True)
        msg, answered = stream.sent[0]
        assert torch.equal(rings.hidden(msg.shared_hidden), out)  # the next stage reads it in the ring
        assert not final.done()
        result = node_pb2.StepResult(step_id=11)
        result.shared_tokens.CopyFrom(rings.put_tokens(msg.shared_hidden, torch.tensor([40, 41])))
        answered.set_result(result)
        got = final.result(timeout=5)
        assert [(t.request_id, t.slot, t.token_id) for t in got.tokens] == [("r3", 3, 40), ("r1", 1, 41)]
        assert not got.HasField("shared_tokens")
        rows, tokens = link.device_tokens(11, timeout_s=5)
        assert rows == {3: 0, 1: 1} and tokens.tolist() == [40, 41]
        assert link.device_tokens(12, timeout_s=5) is None  # a step it never sent
        for step_id in range(12, 12 + link.slots):  # the slot was released: the ring goes round again
            link.forward(stream, _step(step_id, [0]), torch.zeros(1, HIDDEN), keep=False)
            stream.sent[-1][1].set_result(node_pb2.StepResult(step_id=step_id, error="dropped"))
        assert link.device_tokens(11, timeout_s=5) is None  # its slot went to a later step
    finally:
        link.close()
        rings.clear()


def test_forward_passes_errors_and_answers_that_do_not_fit_on() -> None:
    link, rings = _linked_pair()
    stream = FakeStream()
    try:
        plain = link.forward(stream, _step(1, [0]), torch.zeros(1, HIDDEN), keep=True)
        stream.sent[0][1].set_result(node_pb2.StepResult(step_id=1, error="stage 4-7: boom"))
        assert plain.result(timeout=5).error == "stage 4-7: boom"
        assert link.device_tokens(1, timeout_s=5) is None  # nothing in the ring for it
        wrong = link.forward(stream, _step(2, [0, 1]), torch.zeros(2, HIDDEN), keep=True)
        msg = stream.sent[1][0]
        result = node_pb2.StepResult(step_id=2)
        result.shared_tokens.CopyFrom(rings.put_tokens(msg.shared_hidden, torch.tensor([7])))  # one token for two
        stream.sent[1][1].set_result(result)
        with pytest.raises(RuntimeError, match="2 sequences"):
            wrong.result(timeout=5)
        assert link.device_tokens(2, timeout_s=5) is None
        lost = link.forward(stream, _step(3, [0]), torch.zeros(1, HIDDEN), keep=True)
        stream.sent[2][1].set_exception(ConnectionError("the next stage is gone"))
        with pytest.raises(ConnectionError):
            lost.result(timeout=5)
        unanswered = link.forward(stream, _step(4, [0]), torch.zeros(1, HIDDEN), keep=True)
        with pytest.raises(ValueError, match="has not come back"):
            link.device_tokens(4, timeout_s=0.05)
        assert not unanswered.done()
    finally:
        link.close()
        rings.clear()
