"""Step rings shared by two processes of one machine (node/peer_ring.py): a CPU file ring here, and a CUDA
IPC ring on the GPU machine; mappings that cannot be trusted are refused."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from node.peer_ring import ReceivedRings, RingLink, SharedRing, device_id, host_id
from node.wire import WireError
from tensorfleet.v1 import common_pb2, node_pb2

HIDDEN = 8


def _downstream(offer: bytes, device: str, steps: int, out) -> None:  # noqa: ANN001 - a multiprocessing queue
    """The next stage's side, in another process: accept the ring, then for each step read the hidden
    states from the slot and answer with tokens = their row sums (as int64) in the token ring."""
    try:
        rings = ReceivedRings(torch.device(device), is_last=True)
        answer = rings.accept(node_pb2.ShareRequest.FromString(offer), hidden_size=HIDDEN)
        out.put(answer.SerializeToString())
        for _ in range(steps):
            slot = node_pb2.SharedSlot.FromString(out_get(out))
            x = rings.hidden(slot)
            tokens = x.float().sum(dim=1).round().long()
            out.put(rings.put_tokens(slot, tokens).SerializeToString())
    except BaseException as e:  # noqa: BLE001 - reported to the test
        out.put(f"error: {e!r}".encode())


def out_get(q) -> bytes:  # noqa: ANN001
    msg = q.get(timeout=60)
    if msg.startswith(b"error:"):
        raise AssertionError(msg.decode())
    return msg


def run_two_processes(device: str, dtype: torch.dtype) -> None:
    dev = torch.device(device)
    hidden = SharedRing.allocate((4, 3, HIDDEN), dtype, dev)
    offer = node_pb2.ShareRequest(epoch=common_pb2.PlacementEpoch(value=1), ring_id=7, host_id=host_id(),
                                  device_id=device_id(dev), hidden=hidden.export())
    ctx = mp.get_context("spawn")
    to_child, from_child = ctx.Queue(), ctx.Queue()
    steps = 6  # more than the ring's slots: slots are reused once released
    # One queue each way is enough: the child reads requests and writes answers on the same one, in turn.
    child = ctx.Process(target=_downstream_pipe, args=(offer.SerializeToString(), device, steps, to_child, from_child))
    child.start()
    link = None
    try:
        answer = node_pb2.ShareResponse.FromString(out_get(from_child))
        assert answer.accepted, answer.reason
        link = RingLink(7, hidden, SharedRing.open(answer.tokens, dev))
        for step in range(1, steps + 1):
            rows = 1 + step % 3
            out = torch.arange(rows * HIDDEN, dtype=torch.float32, device=dev).view(rows, HIDDEN).to(dtype) + step
            slot = link.send(step, out)
            to_child.put(slot.SerializeToString())
            got = node_pb2.SharedSlot.FromString(out_get(from_child))
            link.check_answer(slot, got, rows)
            expected = out.float().sum(dim=1).round().long().tolist()
            device_tokens = link.device_tokens(got.index, got.rows, step)
            assert device_tokens is not None and device_tokens.tolist() == expected
            assert link.host_tokens(got.index, got.rows) == expected
            link.release(slot.index)
        child.join(60)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        (link or hidden).close()


def _downstream_pipe(offer: bytes, device: str, steps: int, inbox, outbox) -> None:  # noqa: ANN001
    class Both:
        def put(self, msg: bytes) -> None:
            outbox.put(msg)

        def get(self, timeout: float) -> bytes:
            return inbox.get(timeout=timeout)

    _downstream(offer, device, steps, Both())


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
        assert link.device_tokens(0, 1, 4) is None  # no token ring: the next stage is not the last
    finally:
        link.close()
