"""Step buffers shared by two stages on one machine, so that small steps skip the network stack.

Two stages on one GPU (or two CPU stages on one host) would otherwise pass every decode step's hidden
states through the device-to-host copy, protobuf and a TCP socket, and the sampled tokens back the same
way; at batch 1 those hops, not the GPU, set the pace. Over a ring set up once by Stage.Share:

- the upstream stage copies the step's hidden states into ring slot k on its device, records event k
  and sends the StepMessage at once, with ``shared_hidden`` naming the slot: its host never waits for
  the device, so the message reaches the next stage while the GPU still computes;
- the next stage's stream waits on event k (on the device, not the host), then reads slot k;
- the last stage writes the sampled tokens into its token ring's slot k, records its event k and
  answers at once (``StepResult.shared_tokens``): the upstream stage gathers a row sent ahead from
  there on the device and copies the tokens to the host for the coordinator on a side stream.

What is left between two stages on one GPU at batch 1 (a step about 0.25 ms longer than one stage's
on an H100: a sixth of a 1B-shaped step, little next to an 8B one) is mostly the GPU switching between
the two processes' contexts, twice a step; under MPS (one shared context) most of it goes. Flags written
on the device by the last stage, so that a row sent ahead need not wait for the answer's two gRPC hops
before its gather is queued (cuStreamWaitValue32), were tried and measured no faster (1.62 vs 1.61 ms
per 1B step on an H100, 1.48 vs 1.47 under MPS): the answer comes back while the GPU is still busy
with the step before.

CUDA rings are mapped with CUDA IPC (cudaIpcMemHandle and interprocess events, as torch's storage
sharing exports them), only between processes on the same GPU; CPU rings are a file in /dev/shm that
each side maps. Either way the mapping is checked against values the owner wrote before it is used.

A slot is reused only after its step's result reached the host of the stage that owns the hidden ring
(``RingLink.release``): by then every stage after it has finished reading its hidden states.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import threading
import uuid
from collections import OrderedDict
from concurrent import futures
from pathlib import Path

import torch

from node.wire import WireError, dtype_from_proto, dtype_to_proto
from tensorfleet.v1 import node_pb2

RING_SLOTS = 16  # steps in flight on one link, at most (lookahead x micro-batches stays well below)
MAX_RING_ROWS = 256  # tokens of one step; longer steps (prefill chunks) go as bytes
RING_WAIT_S = 600.0  # a claim waits this long for the step that held the slot
KEPT_STEPS = 64  # recent steps whose tokens rows sent ahead may take on the device
_CHECK = (3.0, 5.0, 7.0, 11.0)  # written into slot 0 by the owner, read back by the other side


def host_id() -> str:
    """This machine's identity for the purpose of sharing memory: boot id and host name."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{boot}/{socket.gethostname()}"


def device_id(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return f"cuda:{torch.cuda.get_device_properties(device).uuid}"


def _shm_dir() -> str:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


class SharedRing:
    """A buffer [slots, rows, *item] that one process allocated (``allocate``) and another mapped
    (``open``), with one interprocess event per slot on CUDA."""

    def __init__(self, buffer: torch.Tensor, events: list, *, path: str | None, owned: bool) -> None:
        self.buffer, self.events, self.path, self.owned = buffer, events, path, owned
        self.slots, self.rows = buffer.shape[0], buffer.shape[1]

    @classmethod
    def allocate(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> SharedRing:
        numel = math.prod(shape)
        if device.type == "cuda":
            buffer = torch.empty(shape, dtype=dtype, device=device)
            events = [torch.cuda.Event(interprocess=True) for _ in range(shape[0])]
            path = None
        else:
            path = os.path.join(_shm_dir(), f"tensorfleet-ring-{os.getpid()}-{uuid.uuid4().hex}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, numel * dtype.itemsize)
            finally:
                os.close(fd)
            buffer = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
            events = []
        buffer.view(-1)[:len(_CHECK)].copy_(torch.tensor(_CHECK, dtype=dtype))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the check values are in place before the other side looks
        return cls(buffer, events, path=path, owned=True)

    def export(self) -> node_pb2.SharedBuffer:
        msg = node_pb2.SharedBuffer(shape=list(self.buffer.shape), dtype=dtype_to_proto(self.buffer.dtype),
                                    check_values=list(_CHECK))
        if self.path is not None:
            msg.kind, msg.path = "file", self.path
            return msg
        _dev, handle, size, offset, rc_handle, rc_offset, event, event_sync = (
            self.buffer.untyped_storage()._share_cuda_())
        msg.kind = "cuda_ipc"
        msg.ipc_handle, msg.storage_bytes, msg.storage_offset = handle, size, offset
        msg.ref_counter_handle, msg.ref_counter_offset = rc_handle, rc_offset
        msg.ipc_event, msg.ipc_event_sync = event or b"", bool(event_sync)
        msg.slot_events.extend(e.ipc_handle() for e in self.events)
        return msg

    @classmethod
    def open(cls, msg: node_pb2.SharedBuffer, device: torch.device) -> SharedRing:
        """Map a buffer another process exported; WireError if it is malformed or does not check out."""
        shape = tuple(msg.shape)
        dtype = dtype_from_proto(msg.dtype)
        if (len(shape) < 2 or not 0 < shape[0] <= 4 * RING_SLOTS or not 0 < shape[1] <= MAX_RING_ROWS
                or any(d <= 0 for d in shape)):
            raise WireError(f"a shared buffer of shape {list(shape)}")
        numel = math.prod(shape)
        if msg.kind == "file" and device.type == "cpu":
            path = msg.path
            if os.path.dirname(path) != _shm_dir() or not os.path.basename(path).startswith("tensorfleet-ring-"):
                raise WireError(f"{path!r} is not a ring file of this machine")
            if os.path.getsize(path) != numel * dtype.itemsize:
                raise WireError(f"{path} holds {os.path.getsize(path)} bytes, not {numel * dtype.itemsize}")
            buffer = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
            os.unlink(path)  # mapped on both sides now: nothing is left behind when the processes end
            ring = cls(buffer, [], path=None, owned=False)
        elif msg.kind == "cuda_ipc" and device.type == "cuda":
            if len(msg.slot_events) != shape[0] or msg.storage_bytes < numel * dtype.itemsize:
                raise WireError(f"a CUDA ring of {len(msg.slot_events)} events and {msg.storage_bytes} bytes "
                                f"for shape {list(shape)}")
            storage = torch.UntypedStorage._new_shared_cuda(
                device.index or 0, msg.ipc_handle, msg.storage_bytes, msg.storage_offset,
                msg.ref_counter_handle, msg.ref_counter_offset, msg.ipc_event or None, msg.ipc_event_sync)
            buffer = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)
            events = [torch.cuda.Event.from_ipc_handle(device, h) for h in msg.slot_events]
            ring = cls(buffer, events, path=None, owned=False)
        else:
            raise WireError(f"a {msg.kind!r} ring cannot be mapped on {device}")
        seen = ring.buffer.view(-1)[:len(_CHECK)].tolist()
        if seen != list(msg.check_values):
            raise WireError(f"the mapped ring reads {seen}, its owner wrote {list(msg.check_values)}")
        return ring

    def written(self, k: int) -> None:
        """Slot k is written (queued on the current stream): record its event."""
        if self.events:
            self.events[k].record()

    def wait(self, k: int) -> None:
        """The current stream waits (on the device) for the other side's write of slot k."""
        if self.events:
            torch.cuda.current_stream(self.buffer.device).wait_event(self.events[k])

    def close(self) -> None:
        if self.owned and self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass  # the other side mapped it and removed the name


class RingLink:
    """The upstream end of a ring: sends steps through it and reads the tokens the last stage left in
    its token ring (``tokens`` is None when the next stage is not the last).

    ``forward`` is the step path; ``send``, ``check_answer``, ``slot_tokens``, ``host_tokens`` and
    ``release`` are its parts. The stage's ``finisher`` (one thread, in step order) brings each step's
    tokens to the host."""

    def __init__(self, ring_id: int, hidden: SharedRing, tokens: SharedRing | None, *,
                 finisher: futures.Executor | None = None) -> None:
        self.ring_id, self.hidden, self.tokens, self.finisher = ring_id, hidden, tokens, finisher
        self.slots, self.rows = hidden.slots, hidden.rows
        device = hidden.buffer.device
        self._free = [threading.Event() for _ in range(self.slots)]
        for e in self._free:
            e.set()
        self._owner = [0] * self.slots  # the step that holds each slot
        self._next = 0
        # Steps kept for rows sent ahead of them: step id -> ({KV slot: row}, future of the token slot the
        # next stage's answer named, or None where the tokens came back on the host).
        self._kept: OrderedDict[int, tuple[dict[int, int], futures.Future]] = OrderedDict()
        self._cuda = device.type == "cuda"
        if self._cuda and tokens is not None:
            self._copy_stream = torch.cuda.Stream(device)
            self._host = torch.empty((tokens.slots, tokens.rows), dtype=tokens.buffer.dtype, pin_memory=True)

    def fits(self, rows: int) -> bool:
        return rows <= self.rows

    # ------------------------------------------------------------------------------ the step path
    def forward(self, stream, down: node_pb2.StepMessage, out: torch.Tensor, *, keep: bool) -> futures.Future:  # noqa: ANN001
        """Send step ``down`` on ``stream`` (node/stream.py) with its hidden states ``out`` [rows, hidden]
        in the ring: the message leaves before the device has computed them. The future resolves to the
        step's StepResult with the tokens on the host, wherever the last stage left them. With ``keep``,
        ``device_tokens`` serves the rows sent ahead of this step."""
        slot = self.send(down.step_id, out)
        down.shared_hidden.CopyFrom(slot)
        sent = stream.submit(down)
        answered: futures.Future = futures.Future()
        if keep:
            self._kept[down.step_id] = ({s.slot: i for i, s in enumerate(down.sequences)}, answered)
            while len(self._kept) > KEPT_STEPS:
                self._kept.popitem(last=False)
        final: futures.Future = futures.Future()
        sent.add_done_callback(lambda f: self._answered(f, slot, down.sequences, answered, final))
        return final

    def device_tokens(self, step_id: int, timeout_s: float) -> tuple[dict[int, int], torch.Tensor] | None:
        """Kept step ``step_id``'s ({KV slot: row}, tokens [rows]) for work queued next on the current
        stream, which waits for them on the device; None where they are on the host only (or the step is
        not kept). Waits up to ``timeout_s`` for the next stage to answer (ValueError after)."""
        entry = self._kept.get(step_id)
        if entry is None:
            return None
        rows, answered = entry
        try:
            answer = answered.result(timeout=timeout_s)
        except futures.TimeoutError as e:
            raise ValueError(f"the step this one follows ({step_id}) has not come back") from e
        tokens = None if answer is None else self.slot_tokens(answer.index, answer.rows, step_id)
        return None if tokens is None else (rows, tokens)

    def _answered(self, sent: futures.Future, slot: node_pb2.SharedSlot, seqs, answered: futures.Future,  # noqa: ANN001
                  final: futures.Future) -> None:
        """The next stage's answer to a step sent through the ring (on the stream's receiver thread)."""
        try:
            result = sent.result()
            if result.HasField("shared_tokens"):
                self.check_answer(slot, result.shared_tokens, len(seqs))
        except Exception as e:  # noqa: BLE001 - the step, and the rows that follow it, fail with it
            self.release(slot.index)
            answered.set_result(None)
            final.set_exception(e)
            return
        if not result.HasField("shared_tokens"):  # on the host already (or an error)
            self.release(slot.index)
            answered.set_result(None)
            final.set_result(result)
            return
        answer = result.shared_tokens
        answered.set_result(answer)  # a row sent ahead of this step can start on the device now

        def home() -> None:
            try:
                ids = self.host_tokens(answer.index, answer.rows)
            except Exception as e:  # noqa: BLE001 - the step fails with it (and the rows that follow)
                final.set_exception(e)
                return
            finally:
                self.release(slot.index)  # every stage after this one is done with the slot
            result.ClearField("shared_tokens")
            result.tokens.extend(node_pb2.SampledToken(request_id=s.request_id, slot=s.slot, token_id=t)
                                 for s, t in zip(seqs, ids, strict=True))
            final.set_result(result)

        if self.finisher is None:
            home()
        else:
            self.finisher.submit(home)

    # ------------------------------------------------------------------------------------ its parts
    def send(self, step_id: int, out: torch.Tensor) -> node_pb2.SharedSlot:
        """Claim the next slot for step ``step_id`` and write its hidden states ``out`` [rows, hidden]
        there (queued on the current stream, then the slot's event)."""
        k = self._next % self.slots
        if not self._free[k].wait(RING_WAIT_S):
            raise RuntimeError(f"ring slot {k} still holds step {self._owner[k]} after {RING_WAIT_S:g} s")
        self._next += 1
        self._free[k].clear()
        self._owner[k] = step_id
        rows = out.shape[0]
        self.hidden.buffer[k, :rows].copy_(out)
        self.hidden.written(k)
        return node_pb2.SharedSlot(ring_id=self.ring_id, index=k, rows=rows)

    def release(self, k: int) -> None:
        self._free[k].set()

    def check_answer(self, slot: node_pb2.SharedSlot, answer: node_pb2.SharedSlot, sequences: int) -> None:
        """The next stage's tokens (one per sequence) must be in the token slot of the step's slot."""
        if self.tokens is None or answer.ring_id != self.ring_id or answer.index != slot.index or (
                answer.rows != sequences):
            raise RuntimeError(f"the next stage answered slot {slot.index} of a step of {sequences} sequences "
                               f"with tokens in ring {answer.ring_id} slot {answer.index} ({answer.rows} rows)")

    def slot_tokens(self, k: int, rows: int, step_id: int) -> torch.Tensor | None:
        """The tokens [rows] step ``step_id`` left in slot k, for work queued next on the current stream
        (which waits for them on the device); None when the slot went to a later step meanwhile."""
        if self._owner[k] != step_id or self.tokens is None:
            return None
        self.tokens.wait(k)
        return self.tokens.buffer[k, :rows]

    def host_tokens(self, k: int, rows: int) -> list[int]:
        """The tokens of slot k on the host (waits for them and only for them)."""
        buffer = self.tokens.buffer[k, :rows]
        if not self._cuda:
            return buffer.tolist()
        with torch.cuda.stream(self._copy_stream):
            self.tokens.wait(k)
            host = self._host[k, :rows]
            host.copy_(buffer, non_blocking=True)
            self._copy_stream.synchronize()
        return host.tolist()

    def close(self) -> None:
        self.hidden.close()
        if self.tokens is not None:
            self.tokens.close()


MAX_RINGS = 4  # rings a stage keeps mapped (one per upstream peer; older ones are dropped)


class ReceivedRings:
    """The downstream end: the rings upstream stages set up here (Stage.Share), by ring id."""

    def __init__(self, device: torch.device, *, is_last: bool) -> None:
        self.device, self.is_last = device, is_last
        self._rings: dict[int, tuple[SharedRing, SharedRing | None]] = {}
        self._lock = threading.Lock()

    def accept(self, req: node_pb2.ShareRequest, *, hidden_size: int) -> node_pb2.ShareResponse:
        """Map the offered ring (and, on the last stage, allocate the token ring that goes with it), or
        say why not."""
        if req.host_id != host_id():
            return node_pb2.ShareResponse(reason="the stage is on another machine")
        mine = device_id(self.device)
        if req.device_id != mine:
            return node_pb2.ShareResponse(reason=f"the stage computes on {mine}, not {req.device_id}")
        try:
            hidden = SharedRing.open(req.hidden, self.device)
        except (WireError, OSError, RuntimeError) as e:  # malformed, unmappable, or another namespace
            return node_pb2.ShareResponse(reason=f"cannot map the ring: {e}")
        if len(hidden.buffer.shape) != 3 or hidden.buffer.shape[2] != hidden_size:
            return node_pb2.ShareResponse(reason=f"a ring of shape {list(hidden.buffer.shape)} for hidden size "
                                                 f"{hidden_size}")
        response = node_pb2.ShareResponse(accepted=True)
        tokens = None
        if self.is_last:
            tokens = SharedRing.allocate((hidden.slots, hidden.rows), torch.long, self.device)
            response.tokens.CopyFrom(tokens.export())
        with self._lock:
            self._rings[req.ring_id] = (hidden, tokens)
            while len(self._rings) > MAX_RINGS:
                _, old_tokens = self._rings.pop(next(iter(self._rings)))
                if old_tokens is not None:
                    old_tokens.close()
        return response

    def _ring(self, slot: node_pb2.SharedSlot) -> tuple[SharedRing, SharedRing | None]:
        ring = self._rings.get(slot.ring_id)
        if ring is None:
            raise WireError(f"shared hidden states in ring {slot.ring_id}, which this stage does not hold")
        if slot.index >= ring[0].slots or not 0 < slot.rows <= ring[0].rows:
            raise WireError(f"ring slot {slot.index} with {slot.rows} rows; the ring has {ring[0].slots} slots "
                            f"of {ring[0].rows} rows")
        return ring

    def hidden(self, slot: node_pb2.SharedSlot) -> torch.Tensor:
        """The hidden states [rows, hidden] in the slot, for work queued next on the current stream."""
        hidden, _ = self._ring(slot)
        hidden.wait(slot.index)
        return hidden.buffer[slot.index, :slot.rows]

    def has_tokens(self, slot: node_pb2.SharedSlot) -> bool:
        return self._ring(slot)[1] is not None

    def put_tokens(self, slot: node_pb2.SharedSlot, tokens: torch.Tensor) -> node_pb2.SharedSlot:
        """Write a step's sampled tokens [sequences] (no more than its token rows) into the token ring's
        slot (queued, then its event)."""
        _, ring = self._ring(slot)
        n = tokens.shape[0]
        ring.buffer[slot.index, :n].copy_(tokens)
        ring.written(slot.index)
        return node_pb2.SharedSlot(ring_id=slot.ring_id, index=slot.index, rows=n)

    def clear(self) -> None:
        with self._lock:
            rings, self._rings = list(self._rings.values()), {}
        for _, tokens in rings:
            if tokens is not None:
                tokens.close()
