"""The scheduler: admits requests to KV slots and drives batch steps through the pipeline.

Each iteration prefills the newly admitted requests together, or else decodes one token for every
running request; a finished or cancelled request frees its slot at once. (Continuous batching with
several micro-batches in flight arrives with the batching issue; the step interface is already the
one it needs.)
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.detokenize import IncrementalDetokenizer
from engine.sampling import SamplingParams, apply_stop, finish_reason_for_length
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
        self.step_fn: Callable[[node_pb2.StepMessage], node_pb2.StepResult] | None = None
        self.epoch = 0
        self.free_slots: list[int] = []
        self.step_ids = itertools.count(1)
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------ control surface
    def set_pipeline(self, step_fn: Callable[[node_pb2.StepMessage], node_pb2.StepResult], *, epoch: int,
                     num_slots: int) -> None:
        with self.cv:
            self.step_fn, self.epoch = step_fn, epoch
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
                self.cv.wait_for(lambda: self.stopped or (self.step_fn is not None and (self.waiting or self.running)))
                if self.stopped:
                    return
                self._drop_cancelled()
                admitted = self._admit()
                batch = admitted or list(self.running)
                step_fn, epoch = self.step_fn, self.epoch
            if batch:
                self._run_step(batch, step_fn, epoch)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req, "cancelled")

    def _admit(self) -> list[Request]:
        admitted = []
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            req.slot, req.cached = self.free_slots.pop(), 0
            self.running.append(req)
            admitted.append(req)
        return admitted

    def _run_step(self, batch: list[Request], step_fn, epoch: int) -> None:  # noqa: ANN001
        msg = node_pb2.StepMessage(epoch=common_pb2.PlacementEpoch(value=epoch), step_id=next(self.step_ids))
        for req in batch:
            msg.sequences.add(request_id=req.request_id, slot=req.slot, start=req.cached,
                              token_ids=req.tokens[req.cached:], sampling=sampling_to_proto(req.params), seed=req.seed)
        try:
            result = step_fn(msg)
            if result.error:
                raise RuntimeError(result.error)
        except Exception as e:  # noqa: BLE001 - every request of the step learns why it failed
            print(f"[coordinator] step {msg.step_id} failed: {e}", file=sys.stderr, flush=True)
            with self.cv:
                for req in batch:
                    req.events.put(Event([], "", "error", error=str(e)))
                    self._release(req)
            return
        with self.cv:
            for req, tok in zip(batch, result.tokens, strict=True):
                self._accept(req, tok.token_id)

    def _accept(self, req: Request, token: int) -> None:
        req.cached = len(req.tokens)
        req.output.append(token)
        text, stopped = req.detok.push(token)
        reason = ("cancelled" if req.cancelled else apply_stop(token, req.params, self.eos_ids)
                  or ("stop" if stopped else None) or finish_reason_for_length(len(req.output), req.params))
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
