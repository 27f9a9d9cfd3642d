"""The scheduler: admits requests to KV slots and drives batch steps through the pipeline.

Iteration-level (continuous) batching: a request joins the running batch as soon as a slot is free and
leaves it the step it finishes, so the batch is re-formed between every two steps. A step mixes decode
rows (one token each) with prefill rows; a prompt longer than what is left of the step's token budget
(``max_step_tokens``) is prefilled in chunks over several steps, so newcomers never stall the decoding
requests for a whole long prompt. Decode rows come first, then prompt chunks in arrival order.

Up to ``micro_batches`` steps are in flight at once (one per pipeline stage keeps every stage busy): the
running requests are split into groups, each group's next step leaves as soon as its previous one
returns, and a request is never in two steps at once (its next input is the token the previous step
sampled). A finished or cancelled request frees its slot at once.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from coordinator import defaults
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


@dataclass(frozen=True)
class Load:
    running: int
    waiting: int
    slots: int
    slots_free: int
    micro_batches: int
    steps_in_flight: int


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
    cached: int = 0  # tokens whose k/v the slot holds (or will, once the step in flight returns)
    cancelled: bool = False
    in_flight: bool = False
    arrival: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def todo(self) -> int:
        """Tokens the slot does not hold yet (1 while decoding), counted without building ``tokens``."""
        return len(self.prompt) + len(self.output) - self.cached

    def next_tokens(self, n: int) -> list[int]:
        """The ``n`` tokens after the cached ones: a prompt chunk, or the last sampled token."""
        start, split = self.cached, len(self.prompt)
        if start >= split:
            return self.output[start - split:start - split + n]
        return self.prompt[start:start + n] + self.output[:max(0, start + n - split)]


class Scheduler:
    def __init__(self, *, eos_ids: set[int], max_queue: int = defaults.MAX_QUEUE,
                 max_step_tokens: int = defaults.MAX_STEP_TOKENS) -> None:
        if max_queue < 0 or max_step_tokens < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 0 and max_step_tokens={max_step_tokens} >= 1")
        self.eos_ids = eos_ids
        self.max_queue = max_queue
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cv = threading.Condition()
        self.submit_fn: Callable[[node_pb2.StepMessage], Future] | None = None
        self.epoch = 0
        self.micro_batches = 1
        self.steps_in_flight = 0
        self.num_slots = 0
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
            self.num_slots = num_slots
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

    def load(self) -> Load:
        with self.cv:
            return Load(running=len(self.running), waiting=len(self.waiting), slots=self.num_slots,
                        slots_free=len(self.free_slots), micro_batches=self.micro_batches,
                        steps_in_flight=self.steps_in_flight)

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()

    # ------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self.cv:
                step = None
                while not self.stopped and (step := self._next_step()) is None:
                    self.cv.wait()
                if self.stopped:
                    return
                for req, _ in step:
                    req.in_flight = True
                self.steps_in_flight += 1
                submit_fn, epoch = self.submit_fn, self.epoch
            self._send(step, submit_fn, epoch)

    def _next_step(self) -> list[tuple[Request, int]] | None:
        """The next step to send as (request, new tokens) rows, or None. Called with the lock held.

        A group holds about 1/micro_batches of the running requests, so the groups stay balanced; its
        decode rows come first, then prompt chunks within what is left of the token budget.
        """
        if self.submit_fn is None or self.steps_in_flight >= self.micro_batches:
            return None
        for req in [r for r in self.running if r.cancelled and not r.in_flight]:
            self._finish(req, "cancelled")
        while self.waiting and self.free_slots:  # admission: a free slot is all a request needs
            req = self.waiting.popleft()
            req.slot, req.cached = self.free_slots.pop(), 0
            self.running.append(req)
        idle = [r for r in self.running if not r.in_flight]
        if not idle:
            return None
        group = -(-len(self.running) // self.micro_batches)  # ceil
        budget = self.max_step_tokens
        rows = []
        for req in idle:
            if len(rows) < group and budget > 0 and req.todo == 1:
                rows.append((req, 1))
                budget -= 1
        for req in idle:
            todo = req.todo
            if len(rows) < group and budget > 0 and todo > 1:
                rows.append((req, min(todo, budget)))
                budget -= rows[-1][1]
        return rows

    def _send(self, step: list[tuple[Request, int]], submit_fn, epoch: int) -> None:  # noqa: ANN001
        msg = node_pb2.StepMessage(epoch=common_pb2.PlacementEpoch(value=epoch), step_id=next(self.step_ids))
        for req, n in step:
            msg.sequences.add(request_id=req.request_id, slot=req.slot, start=req.cached,
                              token_ids=req.next_tokens(n), sampling=sampling_to_proto(req.params),
                              seed=req.seed)
        try:
            future = submit_fn(msg)
        except Exception as e:  # noqa: BLE001 - reported like a failed step
            future = Future()
            future.set_exception(e)
        future.add_done_callback(lambda f: self._on_result(step, msg.step_id, f))

    def _on_result(self, step: list[tuple[Request, int]], step_id: int, future: Future) -> None:
        try:
            result = future.result()
            error = result.error or None
        except Exception as e:  # noqa: BLE001 - every request of the step learns why it failed
            result, error = None, str(e) or type(e).__name__
        with self.cv:
            self.steps_in_flight -= 1
            for req, _ in step:
                req.in_flight = False
            if error is not None:
                print(f"[coordinator] step {step_id} failed: {error}", file=sys.stderr, flush=True)
                for req, _ in step:
                    req.events.put(Event([], "", "error", error=error))
                    self._release(req)
            else:
                for (req, n), tok in zip(step, result.tokens, strict=True):
                    req.cached += n
                    if req.todo == 0:  # else a prompt chunk: its sampled token is not used
                        self._accept(req, tok.token_id)
                    elif req.cancelled:
                        self._finish(req, "cancelled")
            self.cv.notify_all()

    def _accept(self, req: Request, token: int) -> None:
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
