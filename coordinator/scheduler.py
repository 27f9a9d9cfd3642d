"""The scheduler: admits requests to KV slots and drives batch steps through the pipeline.

Up to ``micro_batches`` steps are in flight at once (one per pipeline stage keeps every stage busy):
the running requests are split into groups, each group's next step leaves as soon as its previous one
returns, and a request is never in two steps at once (its next input is the token the previous step
sampled). Newly admitted requests are prefilled together in a step of their own; a finished or
cancelled request frees its slot at once.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.detokenize import IncrementalDetokenizer
from engine.sampling import SamplingParams, finish_reason
from node.wire import sampling_to_proto
from tensorfleet.v1 import common_pb2, node_pb2


@dataclass(frozen=True)
class Event:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    detok: IncrementalDetokenizer
    events: queue.Queue = field(default_factory=queue.Queue)
    output: list[int] = field(default_factory=list)
    slot: int = -1
    cached: int = 0
    cancelled: bool = False
    in_flight: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Scheduler:
    def __init__(self, *, eos_ids: set[int], max_queue: int = 1024) -> None:
        self.eos_ids = eos_ids
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cv = threading.Condition()
        self.submit_fn: Callable[[node_pb2.StepMessage], Future] | None = None
        self.epoch = 0
        self.micro_batches = 1
        self.steps_in_flight = 0
        self.free_slots: list[int] = []
        self.step_ids = itertools.count(1)
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------ control surface
    def set_pipeline(self, submit_fn: Callable[[node_pb2.StepMessage], Future], *, epoch: int, num_slots: int,
                     micro_batches: int = 1) -> None:
        """``submit_fn`` sends a step and returns the future of its StepResult."""
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches} must be >= 1")
        with self.cv:
            self.submit_fn, self.epoch, self.micro_batches = submit_fn, epoch, micro_batches
            self.free_slots = list(range(num_slots - 1, -1, -1))
            self.cv.notify_all()

    def submit(self, req: Request) -> None:
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                raise OverflowError(f"the queue is full ({self.max_queue} requests waiting)")
            self.waiting.append(req)
            self.cv.notify_all()

    def cancel(self, req: Request) -> None:
        """Cancel a request: a waiting one ends now, a running one at the next step (its slot is freed)."""
        with self.cv:
            req.cancelled = True
            if req in self.waiting:
                self.waiting.remove(req)
                req.events.put(Event([], "", "cancelled"))  # its handler is waiting on the queue
            self.cv.notify_all()

    def counts(self) -> tuple[int, int]:
        with self.cv:
            return len(self.running), len(self.waiting)

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()

    # ------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.stopped or self._ready_batch(peek=True) is not None)
                if self.stopped:
                    return
                batch = self._ready_batch()
                for req in batch:
                    req.in_flight = True
                self.steps_in_flight += 1
                submit_fn, epoch = self.submit_fn, self.epoch
            self._send(batch, submit_fn, epoch)

    def _ready_batch(self, *, peek: bool = False) -> list[Request] | None:
        """The next step to send, or None: newcomers to prefill first, else a group of idle running
        requests (about 1/micro_batches of them, so the groups stay balanced). Called with the lock held;
        ``peek`` only says whether there is one."""
        if self.submit_fn is None or self.steps_in_flight >= self.micro_batches:
            return None
        for req in [r for r in self.running if r.cancelled and not r.in_flight]:
            self._finish(req, "cancelled")
        if self.waiting and self.free_slots:
            return [] if peek else self._admit()
        idle = [r for r in self.running if not r.in_flight]
        if not idle:
            return None
        group = -(-len(self.running) // self.micro_batches)  # ceil
        return idle[:group]

    def _admit(self) -> list[Request]:
        admitted = []
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            req.slot, req.cached = self.free_slots.pop(), 0
            self.running.append(req)
            admitted.append(req)
        return admitted

    def _send(self, batch: list[Request], submit_fn, epoch: int) -> None:  # noqa: ANN001
        msg = node_pb2.StepMessage(epoch=common_pb2.PlacementEpoch(value=epoch), step_id=next(self.step_ids))
        for req in batch:
            msg.sequences.add(request_id=req.request_id, slot=req.slot, start=req.cached,
                              token_ids=req.tokens[req.cached:], sampling=sampling_to_proto(req.params), seed=req.seed)
        try:
            future = submit_fn(msg)
        except Exception as e:  # noqa: BLE001 - reported like a failed step
            future = Future()
            future.set_exception(e)
        future.add_done_callback(lambda f: self._on_result(batch, msg.step_id, f))

    def _on_result(self, batch: list[Request], step_id: int, future: Future) -> None:
        try:
            result = future.result()
            error = result.error or None
        except Exception as e:  # noqa: BLE001 - every request of the step learns why it failed
            result, error = None, str(e) or type(e).__name__
        with self.cv:
            self.steps_in_flight -= 1
            for req in batch:
                req.in_flight = False
            if error is not None:
                print(f"[coordinator] step {step_id} failed: {error}", file=sys.stderr, flush=True)
                for req in batch:
                    req.events.put(Event([], "", "error", error=error))
                    self._release(req)
            else:
                for req, tok in zip(batch, result.tokens, strict=True):
                    self._accept(req, tok.token_id)
            self.cv.notify_all()

    def _accept(self, req: Request, token: int) -> None:
        req.cached = len(req.tokens)
        req.output.append(token)
        text, stopped = req.detok.push(token)
        reason = "cancelled" if req.cancelled else finish_reason(token, len(req.output), req.params, self.eos_ids,
                                                                 stop_string_seen=stopped)
        if reason is None:
            req.events.put(Event([token], text))
            return
        req.events.put(Event([token], text + req.detok.finish(), reason))
        self._release(req)

    def _finish(self, req: Request, reason: str) -> None:
        req.events.put(Event([], req.detok.finish(), reason))
        self._release(req)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
            self.free_slots.append(req.slot)
