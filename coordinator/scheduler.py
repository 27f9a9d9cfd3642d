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

Lookahead (``lookahead=k``): a decoding request whose step is in flight may go into the next step too,
before that step returns, as a row "sent ahead" (SequenceStep.after_step) whose input is the token the
step in flight will sample; stage 0 fills it in (on the device itself when it is also the last stage).
Up to k such rows of a request are in flight behind its oldest step.
So the pipeline never waits for a step's round trip through the coordinator: at batch 1 on one GPU the
next step is queued while the current one computes. A request that turns out to have finished (EOS, a
stop) wastes its row in the step sent ahead, whose token is dropped; one that would reach max_tokens is
never sent ahead. Its slot is freed at once: the stale row writes the slot's KV cache before any later
step of the slot's next request (stages compute steps in the order sent), at a position that request
writes itself before it reads it.

Failover: ``pause`` detaches the pipeline and puts every running request back at the head of the queue
with the tokens it has generated; the next pipeline (``set_pipeline``) replays each as one prompt (its
prompt plus those tokens) and it continues where it was. Sampling is a function of the request's seed
and the token position, so the continuation equals what an undisturbed run would have produced. Steps
of an older pipeline that still return are ignored (a generation counter fences them). A step that
fails holds the pipeline and asks ``on_step_error`` whether a node is gone (then the coordinator fails
over) or the step itself was bad (then ``fail_held`` ends its requests with the error).
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from coordinator import defaults
from coordinator.logs import log
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

    def then(self, nxt: Event) -> Event:
        """This event merged with the next one of the same request (a reader that fell behind)."""
        return Event(self.token_ids + nxt.token_ids, self.text + nxt.text, nxt.finish_reason, nxt.error)


@dataclass(frozen=True)
class Row:
    """One request's row of a step: ``n`` new tokens from position ``start``; ``tokens`` is empty for a
    row sent ahead, whose token is the one step ``after_step`` samples."""

    req: Request
    n: int
    start: int
    tokens: list[int]
    after_step: int = 0


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
    cached: int = 0  # tokens whose k/v the slot holds (the steps that returned)
    cancelled: bool = False
    finished: bool = False  # ended (its last event sent): results of steps still in flight are dropped
    flight: list[tuple[int, int]] = field(default_factory=list)  # (step id, new tokens) in flight, oldest first
    held_error: str | None = None  # its step failed; it waits for the coordinator's verdict
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # monotonic: when it first got a slot
    first_token_at: float | None = None  # monotonic; kept across a replay, as the client saw it then

    @functools.cached_property
    def sampling(self) -> common_pb2.SamplingParams:
        """``params`` as the steps carry them, built once (every step of the request sends them)."""
        return sampling_to_proto(self.params)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def in_flight(self) -> int:
        """How many steps in flight hold a row of this request."""
        return len(self.flight)

    @property
    def sent(self) -> int:
        """Tokens the slot will hold once the steps in flight return."""
        return self.cached + sum(n for _, n in self.flight)

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
                 max_step_tokens: int = defaults.MAX_STEP_TOKENS, lookahead: int = 0,
                 on_step_error: Callable[[str], None] | None = None) -> None:
        if max_queue < 0 or max_step_tokens < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 0 and max_step_tokens={max_step_tokens} >= 1")
        if not 0 <= lookahead <= defaults.MAX_LOOKAHEAD:
            raise ValueError(f"lookahead={lookahead} must be 0 (off) to {defaults.MAX_LOOKAHEAD} (steps a decoding "
                             "request is sent ahead)")
        self.lookahead = lookahead
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
        self.generation = 0  # bumped by pause(): results of older steps are ignored
        self.on_step_error = on_step_error
        self.holding = False  # a step failed: nothing is sent until the coordinator decides
        self.unavailable_since: float | None = time.monotonic()  # no pipeline since
        self.resumed_at: float | None = None
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
            self.unavailable_since = None
            self.resumed_at = time.monotonic() if self.generation else None  # after a pause: report the first token
            self.cv.notify_all()

    def pause(self, *, drain_s: float = 0.0) -> int:
        """Detach the pipeline; running requests go back to the head of the queue, to be replayed.

        ``drain_s`` > 0 first waits (up to that long) for the steps in flight to return, so that their
        tokens count (a graceful drain); after a failure their results are lost anyway. Returns how many
        requests will be replayed.
        """
        with self.cv:
            self.holding = True  # no new step from here on
            deadline = time.monotonic() + drain_s
            while self.steps_in_flight and (left := deadline - time.monotonic()) > 0:
                self.cv.wait(left)
            self.generation += 1
            self.submit_fn, self.steps_in_flight, self.holding = None, 0, False
            self.num_slots, self.free_slots = 0, []
            if self.unavailable_since is None:
                self.unavailable_since = time.monotonic()
            replay = []
            for req in sorted(self.running, key=lambda r: r.arrival):
                req.flight, req.held_error = [], None
                if req.cancelled:
                    self._end(req, Event([], req.detok.finish(), "cancelled"))
                    continue
                req.slot, req.cached = -1, 0
                replay.append(req)
            self.running = []
            self.waiting.extendleft(reversed(replay))
            self.cv.notify_all()
            return len(replay)

    def fail_held(self) -> None:
        """The failed step was bad, not a node: end its requests with their step's error and go on."""
        with self.cv:
            for req in [r for r in self.running if r.held_error is not None]:
                self._end(req, Event([], "", "error", error=f"the pipeline failed: {req.held_error}"))
                self._release(req)
            self.holding = False
            self.cv.notify_all()

    def expire_waiting(self, deadline_s: float, reason: str) -> int:
        """While no pipeline serves, fail the requests that waited longer than ``deadline_s`` (counted
        from their arrival or from when service stopped, whichever is later). Returns how many."""
        with self.cv:
            if self.submit_fn is not None or self.unavailable_since is None:
                return 0
            now = time.monotonic()
            expired = [r for r in self.waiting if now - max(r.arrival, self.unavailable_since) > deadline_s]
            for req in expired:
                self.waiting.remove(req)
                self._end(req, Event([], "", "error", error=f"no capacity to serve it for {deadline_s:g} s: {reason}"))
            return len(expired)

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
                self._end(req, Event([], "", "cancelled"))  # its handler is waiting on the queue
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
                step_id = next(self.step_ids)
                for row in step:
                    row.req.flight.append((step_id, row.n))
                self.steps_in_flight += 1
                submit_fn, epoch, generation = self.submit_fn, self.epoch, self.generation
            self._send(step, step_id, submit_fn, epoch, generation)

    def _next_step(self) -> list[Row] | None:
        """The next step to send, as rows, or None. Called with the lock held.

        A group holds about 1/micro_batches of the running requests, so the groups stay balanced; its
        decode rows come first, then rows sent ahead, then prompt chunks within what is left of the token
        budget. With lookahead k, up to k+1 times as many steps are in flight.
        """
        limit = self.micro_batches * (1 + self.lookahead)
        if self.submit_fn is None or self.holding or self.steps_in_flight >= limit:
            return None
        for req in [r for r in self.running if r.cancelled and not r.in_flight]:
            self._finish(req, "cancelled")
        while self.waiting and self.free_slots:  # admission: a free slot is all a request needs
            req = self.waiting.popleft()
            req.slot, req.cached = self.free_slots.pop(), 0
            self.running.append(req)
            if req.admitted_at is None:  # a replay after a failover is not a new admission
                req.admitted_at = time.monotonic()
                log("request admitted", request_id=req.request_id, prompt_tokens=len(req.prompt),
                    queued_s=round(req.admitted_at - req.arrival, 4))
        idle = [r for r in self.running if not r.in_flight and r.held_error is None]
        ahead = sorted((r for r in self.running if self._can_send_ahead(r)), key=lambda r: r.flight[-1][0])
        if not idle and not ahead:
            return None
        group = -(-len(self.running) // self.micro_batches)  # ceil
        budget = self.max_step_tokens
        rows = []
        for req in idle:
            if len(rows) < group and budget > 0 and req.todo == 1:
                rows.append(Row(req, 1, req.cached, req.next_tokens(1)))
                budget -= 1
        for req in ahead:
            if len(rows) < group and budget > 0:
                rows.append(Row(req, 1, req.sent, [], after_step=req.flight[-1][0]))
                budget -= 1
        for req in idle:
            todo = req.todo
            if len(rows) < group and budget > 0 and todo > 1:
                n = min(todo, budget)
                rows.append(Row(req, n, req.cached, req.next_tokens(n)))
                budget -= n
        return rows or None

    def _can_send_ahead(self, req: Request) -> bool:
        """A decoding request whose steps in flight (at most ``lookahead``) each sample its next input (the
        first its whole input sent, the others rows sent ahead), and whose token they bring will not be its
        last by length: it may go into the next step already."""
        n = req.in_flight
        return (1 <= n <= self.lookahead and req.held_error is None and not req.cancelled
                and req.sent - len(req.prompt) - len(req.output) == n - 1
                and len(req.output) + n < req.params.max_tokens)

    def _send(self, step: list[Row], step_id: int, submit_fn, epoch: int, generation: int) -> None:  # noqa: ANN001
        msg = node_pb2.StepMessage(epoch=common_pb2.PlacementEpoch(value=epoch), step_id=step_id)
        try:  # nothing may end this thread: a step that cannot be built or sent fails like any other
            for row in step:
                req = row.req
                msg.sequences.add(request_id=req.request_id, slot=req.slot, start=row.start, token_ids=row.tokens,
                                  sampling=req.sampling, seed=req.seed, after_step=row.after_step)
            future = submit_fn(msg)
        except Exception as e:  # noqa: BLE001 - reported like a failed step
            future = Future()
            future.set_exception(e)
        future.add_done_callback(lambda f: self._on_result(step, msg.step_id, generation, f))

    def _on_result(self, step: list[Row], step_id: int, generation: int, future: Future) -> None:
        try:
            result = future.result()
            error = result.error or None
        except Exception as e:  # noqa: BLE001 - every request of the step learns why it failed
            result, error = None, str(e) or type(e).__name__
        with self.cv:
            if generation != self.generation:  # a step of a pipeline that is gone: replayed elsewhere
                return
            self.steps_in_flight -= 1
            for row in step:  # steps return in the order sent: this is each row's oldest step in flight
                if row.req.flight and row.req.flight[0][0] == step_id:
                    row.req.flight.pop(0)
            live = [row for row in step if not row.req.finished]
            if error is not None:
                log(f"step {step_id} failed: {error}")
                if self.on_step_error is None:
                    for row in live:
                        self._end(row.req, Event([], "", "error", error=f"the pipeline failed: {error}"))
                        self._release(row.req)
                else:  # hold everything until the coordinator knows whether a node is gone
                    for row in live:
                        row.req.held_error = error
                    if not self.holding:
                        self.holding = True
                        threading.Thread(target=self.on_step_error, args=(error,), daemon=True).start()
            else:
                for row, tok in zip(step, result.tokens, strict=True):
                    req = row.req
                    if req.finished:  # ended while this step was in flight (a row sent ahead): dropped
                        continue
                    req.cached += row.n
                    if req.todo == 0:  # else a prompt chunk: its sampled token is not used
                        self._accept(req, tok.token_id)
                    elif req.cancelled and not req.in_flight:
                        self._finish(req, "cancelled")
            self.cv.notify_all()

    def _accept(self, req: Request, token: int) -> None:
        if self.resumed_at is not None:
            log(f"tokens flow again {time.monotonic() - self.resumed_at:.2f} s after the pipeline resumed")
            self.resumed_at = None
        req.output.append(token)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        text, stopped = req.detok.push(token)
        reason = "cancelled" if req.cancelled else finish_reason(token, len(req.output), req.params, self.eos_ids,
                                                                 stop_string_seen=stopped)
        if reason is None:
            req.events.put(Event([token], text))
            return
        self._end(req, Event([token], text + req.detok.finish(), reason))
        self._release(req)

    def _finish(self, req: Request, reason: str) -> None:
        self._end(req, Event([], req.detok.finish(), reason))
        self._release(req)

    def _end(self, req: Request, last: Event) -> None:
        """Every request ends here (its slot, if any, is the caller's to free): the last event, and one
        log line that sums it up (written first: whoever reads the event may look for the line)."""
        req.finished = True
        ttft = None if req.first_token_at is None else round(req.first_token_at - req.arrival, 4)
        extra = {} if last.error is None else {"error": last.error}
        log("request finished", request_id=req.request_id, finish_reason=last.finish_reason,
            prompt_tokens=len(req.prompt), completion_tokens=len(req.output), ttft_s=ttft,
            total_s=round(time.monotonic() - req.arrival, 4), **extra)
        req.events.put(last)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
            self.free_slots.append(req.slot)
