"""The scheduler against a fake pipeline: slots, batching, finish reasons, cancellation, failures."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future

import pytest

from coordinator import defaults
from coordinator.scheduler import Event, Request, Scheduler
from engine.detokenize import IncrementalDetokenizer
from engine.sampling import SamplingParams
from tensorfleet.v1 import node_pb2

EOS = 3


class FakePipeline:
    """Token = 10 + position, except EOS at position ``eos_at`` (when set); records every step."""

    def __init__(self, eos_at: int | None = None, fail: bool = False) -> None:
        self.eos_at, self.fail, self.steps = eos_at, fail, []
        self.lock = threading.Lock()

    def __call__(self, msg: node_pb2.StepMessage) -> Future:
        with self.lock:
            self.steps.append([(s.slot, s.start, list(s.token_ids)) for s in msg.sequences])
        done: Future = Future()
        if self.fail:
            done.set_result(node_pb2.StepResult(step_id=msg.step_id, error="stage 1 is gone"))
            return done
        result = node_pb2.StepResult(step_id=msg.step_id)
        for s in msg.sequences:
            pos = s.start + len(s.token_ids)
            result.tokens.add(request_id=s.request_id, slot=s.slot, token_id=EOS if pos == self.eos_at else 10 + pos)
        done.set_result(result)
        return done


def request(rid: str, prompt_len: int = 4, **params) -> Request:  # noqa: ANN003
    return Request(request_id=rid, prompt=list(range(100, 100 + prompt_len)), params=SamplingParams(**params),
                   seed=1, detok=IncrementalDetokenizer(None))


def collect(req: Request, timeout: float = 10.0) -> list[Event]:
    events = []
    while not events or events[-1].finish_reason is None:
        events.append(req.events.get(timeout=timeout))
    return events


@pytest.fixture
def scheduler():  # noqa: ANN201
    s = Scheduler(eos_ids={EOS})
    yield s
    s.stop()


def test_requests_finish_by_length_and_free_their_slots(scheduler: Scheduler) -> None:
    pipe = FakePipeline()
    scheduler.set_pipeline(pipe, epoch=1, num_slots=2)
    reqs = [request(f"r{i}", prompt_len=3 + i, max_tokens=5) for i in range(5)]  # more requests than slots
    for r in reqs:
        scheduler.submit(r)
    for r in reqs:
        events = collect(r)
        tokens = [t for e in events for t in e.token_ids]
        assert events[-1].finish_reason == "length"
        assert tokens == [10 + len(r.prompt) + i for i in range(5)]
    assert sorted(scheduler.free_slots) == [0, 1] and scheduler.counts() == (0, 0)
    assert max(len(step) for step in pipe.steps) == 2  # never more sequences than slots
    assert [(start, len(ids)) for _, start, ids in pipe.steps[0]] == [(0, 3), (0, 4)]  # one prefill batch


def test_decode_steps_send_one_token_per_sequence(scheduler: Scheduler) -> None:
    pipe = FakePipeline()
    scheduler.set_pipeline(pipe, epoch=1, num_slots=1)
    r = request("a", prompt_len=4, max_tokens=3)
    scheduler.submit(r)
    collect(r)
    assert pipe.steps[0] == [(0, 0, [100, 101, 102, 103])]
    assert pipe.steps[1] == [(0, 4, [14])] and pipe.steps[2] == [(0, 5, [15])]


def test_eos_stops_unless_ignored(scheduler: Scheduler) -> None:
    scheduler.set_pipeline(FakePipeline(eos_at=6), epoch=1, num_slots=2)
    stop, ignore = request("s", prompt_len=4, max_tokens=8), request("i", prompt_len=4, max_tokens=8, ignore_eos=True)
    scheduler.submit(stop)
    scheduler.submit(ignore)
    assert collect(stop)[-1].finish_reason == "stop"
    events = collect(ignore)
    assert events[-1].finish_reason == "length" and EOS in [t for e in events for t in e.token_ids]


def test_cancel_frees_the_slot(scheduler: Scheduler) -> None:
    scheduler.set_pipeline(FakePipeline(), epoch=1, num_slots=1)
    r = request("c", max_tokens=10_000)
    scheduler.submit(r)
    r.events.get(timeout=10)
    scheduler.cancel(r)
    assert collect(r)[-1].finish_reason == "cancelled"
    waiting = request("w", max_tokens=2)
    scheduler.submit(waiting)
    assert collect(waiting)[-1].finish_reason == "length"  # it got the freed slot


def test_a_failed_step_reaches_every_request_of_it(scheduler: Scheduler) -> None:
    scheduler.set_pipeline(FakePipeline(fail=True), epoch=1, num_slots=2)
    reqs = [request("x"), request("y")]
    for r in reqs:
        scheduler.submit(r)
    for r in reqs:
        ev = r.events.get(timeout=10)
        assert ev.error == "the pipeline failed: stage 1 is gone"
    assert sorted(scheduler.free_slots) == [0, 1]


def test_queue_bound() -> None:
    s = Scheduler(eos_ids=set(), max_queue=1)
    try:
        s.submit(request("a"))
        with pytest.raises(OverflowError, match="queue is full"):
            s.submit(request("b"))
    finally:
        s.stop()


def test_cancelling_a_waiting_request_ends_it_at_once() -> None:
    s = Scheduler(eos_ids=set())  # no pipeline yet: requests wait
    try:
        r = request("w")
        s.submit(r)
        s.cancel(r)
        assert r.events.get(timeout=5).finish_reason == "cancelled"
        assert s.counts() == (0, 0)
    finally:
        s.stop()


class SlowPipeline:
    """Holds each step until the test releases it: shows how many steps are in flight at once."""

    def __init__(self) -> None:
        self.held: list[tuple[node_pb2.StepMessage, Future]] = []
        self.lock = threading.Lock()

    def __call__(self, msg: node_pb2.StepMessage) -> Future:
        done: Future = Future()
        with self.lock:
            self.held.append((msg, done))
        return done

    def release_all(self) -> int:
        with self.lock:
            held, self.held = self.held, []
        for msg, done in held:
            result = node_pb2.StepResult(step_id=msg.step_id)
            for s in msg.sequences:
                result.tokens.add(request_id=s.request_id, slot=s.slot, token_id=10 + s.start + len(s.token_ids))
            done.set_result(result)
        return len(held)


def wait_for(pred, timeout: float = 5.0) -> None:  # noqa: ANN001
    import time

    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_micro_batches_keep_several_steps_in_flight(scheduler: Scheduler) -> None:
    pipe = SlowPipeline()
    scheduler.set_pipeline(pipe, epoch=1, num_slots=8, micro_batches=2)
    reqs = [request(f"r{i}", max_tokens=4) for i in range(4)]
    for r in reqs:
        scheduler.submit(r)
    wait_for(lambda: len(pipe.held) == 2)  # the prompts, in two groups of two, both in flight
    assert [[len(s.token_ids) for s in m.sequences] for m, _ in pipe.held] == [[4, 4], [4, 4]]
    pipe.release_all()
    wait_for(lambda: len(pipe.held) == 2)  # two decode groups of two, both in flight
    assert sorted(len(m.sequences) for m, _ in pipe.held) == [2, 2]
    ids = [{s.request_id for s in m.sequences} for m, _ in pipe.held]
    assert not ids[0] & ids[1]  # no request in two steps at once
    wait_for(lambda: pipe.release_all() >= 0 and all(len(r.output) == 4 for r in reqs))
    for r in reqs:
        events = collect(r)
        assert events[-1].finish_reason == "length"
        assert [t for e in events for t in e.token_ids] == [10 + 4 + i for i in range(4)]


def rows(msg: node_pb2.StepMessage) -> list[tuple[str, int, int]]:
    return [(s.request_id, s.start, len(s.token_ids)) for s in msg.sequences]


def test_newcomers_join_a_running_batch_and_long_prompts_are_chunked() -> None:
    s = Scheduler(eos_ids=set(), max_step_tokens=4)
    pipe = SlowPipeline()
    try:
        s.set_pipeline(pipe, epoch=1, num_slots=4)
        a, b = request("a", prompt_len=2, max_tokens=6), request("b", prompt_len=10, max_tokens=3)
        s.submit(a)
        wait_for(lambda: len(pipe.held) == 1)
        assert rows(pipe.held[0][0]) == [("a", 0, 2)]
        s.submit(b)  # arrives while a's step is in flight: joins at the next step, beside a's decode row
        expected = [[("a", 2, 1), ("b", 0, 3)], [("a", 3, 1), ("b", 3, 3)], [("a", 4, 1), ("b", 6, 3)],
                    [("a", 5, 1), ("b", 9, 1)], [("a", 6, 1), ("b", 10, 1)]]
        for want in expected:
            pipe.release_all()
            wait_for(lambda: len(pipe.held) == 1)
            assert rows(pipe.held[0][0]) == want
        wait_for(lambda: pipe.release_all() >= 0 and len(b.output) == 3 and len(a.output) == 6)
        # the tokens sampled after a prompt chunk are dropped: b's first token follows its whole prompt
        assert [t for e in collect(b) for t in e.token_ids] == [20, 21, 22]
        assert [t for e in collect(a) for t in e.token_ids] == [12, 13, 14, 15, 16, 17]
    finally:
        s.stop()


def test_cancel_during_a_chunked_prefill_frees_the_slot() -> None:
    s = Scheduler(eos_ids=set(), max_step_tokens=4)
    pipe = SlowPipeline()
    try:
        s.set_pipeline(pipe, epoch=1, num_slots=1)
        c = request("c", prompt_len=12, max_tokens=5)
        s.submit(c)
        wait_for(lambda: len(pipe.held) == 1)
        s.cancel(c)
        pipe.release_all()
        events = collect(c)
        assert events[-1].finish_reason == "cancelled" and not c.output
        wait_for(lambda: s.free_slots == [0] and s.counts() == (0, 0))
        d = request("d", prompt_len=2, max_tokens=1)  # the slot serves the next request
        s.submit(d)
        wait_for(lambda: pipe.release_all() >= 0 and len(d.output) == 1)
        assert collect(d)[-1].finish_reason == "length"
    finally:
        s.stop()


def test_step_budget_validation() -> None:
    with pytest.raises(ValueError, match="max_step_tokens=0"):
        Scheduler(eos_ids=set(), max_step_tokens=0)


def test_waiting_events_are_merged_into_one_response() -> None:
    import queue

    from coordinator.server import _coalesce

    q: queue.Queue = queue.Queue()
    for ev in (Event([1], "a"), Event([2], "b"), Event([3], "c", "length"), Event([9], "late")):
        q.put(ev)
    assert _coalesce(q) == Event([1, 2, 3], "abc", "length")  # stops at the final event
    assert _coalesce(q) == Event([9], "late")


# ------------------------------------------------------------------------------------------- failover
class ManualPipeline:
    """Steps wait until the test resolves them (``answer``), to pause with steps in flight."""

    def __init__(self) -> None:
        self.pending: list[tuple[node_pb2.StepMessage, Future]] = []
        self.cv = threading.Condition()

    def __call__(self, msg: node_pb2.StepMessage) -> Future:
        done: Future = Future()
        with self.cv:
            self.pending.append((msg, done))
            self.cv.notify_all()
        return done

    def wait_steps(self, n: int, timeout: float = 10.0) -> list[tuple[node_pb2.StepMessage, Future]]:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.pending) >= n, timeout), f"{len(self.pending)} of {n} steps"
            return list(self.pending)

    @staticmethod
    def answer(msg: node_pb2.StepMessage, done: Future, error: str = "") -> None:
        result = node_pb2.StepResult(step_id=msg.step_id, error=error)
        if not error:
            for s in msg.sequences:
                result.tokens.add(request_id=s.request_id, slot=s.slot, token_id=10 + s.start + len(s.token_ids))
        done.set_result(result)


def tokens_of(req: Request) -> list[int]:
    return [t for ev in collect(req) for t in ev.token_ids]


def test_pause_replays_running_requests_with_their_tokens_and_ignores_late_results() -> None:
    s = Scheduler(eos_ids=set())
    try:
        old = ManualPipeline()
        s.set_pipeline(old, epoch=1, num_slots=2)
        reqs = [request("a", max_tokens=6), request("b", prompt_len=3, max_tokens=6)]
        for r in reqs:
            s.submit(r)
        (msg, done), = old.wait_steps(1)
        old.answer(msg, done)  # prefill: first token of each
        msg2, done2 = old.wait_steps(2)[1]  # a decode step now in flight
        assert s.pause() == 2
        assert s.load().running == 0 and s.load().waiting == 2
        old.answer(msg2, done2)  # the lost pipeline's late answer must change nothing
        assert [r.output for r in reqs] == [[14], [13]]
        new = FakePipeline()
        s.set_pipeline(new, epoch=2, num_slots=2)
        assert [tokens_of(r) for r in reqs] == [[14, 15, 16, 17, 18, 19], [13, 14, 15, 16, 17, 18]]
        # The replay is one prompt from position 0: the prompt plus the token generated before the pause.
        assert sorted(new.steps[0]) == sorted([(s_, 0, [100, 101, 102, 103, 14]) for s_ in [reqs[0].slot]]
                                              + [(reqs[1].slot, 0, [100, 101, 102, 13])])
    finally:
        s.stop()


def test_a_drain_waits_for_the_steps_in_flight() -> None:
    s = Scheduler(eos_ids=set())
    try:
        pipe = ManualPipeline()
        s.set_pipeline(pipe, epoch=1, num_slots=1)
        req = request("a", max_tokens=4)
        s.submit(req)
        (msg, done), = pipe.wait_steps(1)
        threading.Timer(0.2, pipe.answer, args=(msg, done)).start()
        assert s.pause(drain_s=5.0) == 1
        assert req.output == [14]  # the step in flight returned before the pause: its token counts
    finally:
        s.stop()


def test_a_failed_step_holds_until_the_coordinator_decides() -> None:
    verdicts: list[str] = []
    s = Scheduler(eos_ids=set(), on_step_error=verdicts.append)
    try:
        pipe = ManualPipeline()
        s.set_pipeline(pipe, epoch=1, num_slots=2)
        a, b = request("a", max_tokens=3), request("b", max_tokens=3)
        s.submit(a)
        (msg, done), = pipe.wait_steps(1)
        pipe.answer(msg, done, error="stage 1 is gone")
        s.submit(b)
        deadline = threading.Event()
        deadline.wait(0.3)
        assert verdicts == ["stage 1 is gone"]
        assert len(pipe.wait_steps(1)) == 1, "nothing is sent while the scheduler holds"
        assert a.events.empty()
        s.fail_held()  # the coordinator found every node healthy
        assert a.events.get(timeout=5).error == "the pipeline failed: stage 1 is gone"
        msg, done = pipe.wait_steps(2)[1]  # b goes on
        assert [q.request_id for q in msg.sequences] == ["b"]
    finally:
        s.stop()


def test_a_failed_step_then_failover_replays_instead_of_failing(capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORFLEET_LOG_FORMAT", "json")
    s = Scheduler(eos_ids=set(), on_step_error=lambda error: None)
    try:
        pipe = ManualPipeline()
        s.set_pipeline(pipe, epoch=1, num_slots=1)
        req = request("a", max_tokens=3)
        s.submit(req)
        (msg, done), = pipe.wait_steps(1)
        pipe.answer(msg, done, error="stream closed")
        assert s.pause() == 1
        s.set_pipeline(FakePipeline(), epoch=2, num_slots=1)
        assert tokens_of(req) == [14, 15, 16]
    finally:
        s.stop()
    # The replay is the same request: admitted once, finished once, with all its tokens.
    lines = _request_lines(capsys.readouterr().err)
    assert [(x["msg"], x.get("completion_tokens")) for x in lines] == [("request admitted", None),
                                                                       ("request finished", 3)]


def test_without_capacity_requests_wait_up_to_the_deadline() -> None:
    s = Scheduler(eos_ids=set())
    try:
        req = request("a")
        s.submit(req)
        assert s.expire_waiting(60.0, "no node left") == 0
        req.arrival -= 120
        s.unavailable_since -= 120
        assert s.expire_waiting(60.0, "no node left") == 1
        ev = req.events.get(timeout=1)
        assert ev.finish_reason == "error" and "no capacity to serve it for 60 s: no node left" in ev.error
        s.set_pipeline(FakePipeline(), epoch=1, num_slots=1)
        late = request("b")
        late.arrival -= 120
        s.submit(late)
        assert s.expire_waiting(60.0, "x") == 0, "never while a pipeline serves"
    finally:
        s.stop()


def _request_lines(err: str) -> list[dict]:
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [line for line in lines if line["msg"].startswith("request ")]


def test_one_log_line_when_admitted_to_a_slot_and_one_when_finished(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORFLEET_LOG_FORMAT", "json")
    s = Scheduler(eos_ids={EOS})
    try:
        s.set_pipeline(FakePipeline(), epoch=1, num_slots=1)
        done = request("done-1", prompt_len=5, max_tokens=3)
        s.submit(done)
        collect(done)
        s.set_pipeline(FakePipeline(fail=True), epoch=2, num_slots=1)
        failed = request("failed-1", prompt_len=2)
        s.submit(failed)
        collect(failed)
    finally:
        s.stop()
    lines = _request_lines(capsys.readouterr().err)
    assert [(x["msg"], x["request_id"]) for x in lines] == [
        ("request admitted", "done-1"), ("request finished", "done-1"),
        ("request admitted", "failed-1"), ("request finished", "failed-1"),
    ]
    admitted, finished, _, failure = lines
    assert admitted["component"] == "coordinator" and admitted["level"] == "INFO" and admitted["prompt_tokens"] == 5
    assert 0 <= admitted["queued_s"] < 10
    assert (finished["finish_reason"], finished["prompt_tokens"], finished["completion_tokens"]) == ("length", 5, 3)
    assert 0 <= finished["ttft_s"] <= finished["total_s"] < 10 and "error" not in finished
    assert failure["finish_reason"] == "error" and failure["completion_tokens"] == 0 and failure["ttft_s"] is None
    assert failure["error"] == "the pipeline failed: stage 1 is gone"


def test_requests_that_never_got_a_slot_are_logged_once(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORFLEET_LOG_FORMAT", "json")
    s = Scheduler(eos_ids=set())  # no pipeline: requests wait
    try:
        cancelled, expired = request("w-cancelled"), request("w-expired")
        s.submit(cancelled)
        s.submit(expired)
        s.cancel(cancelled)
        s.cancel(cancelled)  # a second cancel (the RPC's end callback) adds no line
        assert s.expire_waiting(0.0, "no nodes") == 1
    finally:
        s.stop()
    lines = _request_lines(capsys.readouterr().err)
    finished = [x for x in lines if x["msg"] == "request finished"]
    assert len(finished) == len(lines)  # never admitted to a slot: no "admitted" line
    assert [(x["request_id"], x["finish_reason"]) for x in finished] == [("w-cancelled", "cancelled"),
                                                                       ("w-expired", "error")]
    assert "no nodes" in finished[1]["error"]


def test_a_step_that_cannot_be_built_fails_its_requests_and_the_scheduler_goes_on(
        scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a step once raised in the scheduler's thread (a number the wire cannot hold): the thread
    died and every later request hung. Now the step fails like any other and the next request runs."""
    import coordinator.scheduler as sched

    real = sched.sampling_to_proto

    def picky(params: SamplingParams):  # noqa: ANN202
        if params.max_tokens == 7:
            raise ValueError("Value out of range: 10102149698498164")
        return real(params)

    monkeypatch.setattr(sched, "sampling_to_proto", picky)
    scheduler.set_pipeline(FakePipeline(), epoch=1, num_slots=1)
    bad, good = request("bad", max_tokens=7), request("good", max_tokens=2)
    scheduler.submit(bad)
    last = collect(bad)[-1]
    assert last.finish_reason == "error" and "out of range" in last.error
    scheduler.submit(good)
    assert collect(good)[-1].finish_reason == "length"


class OrderedPipeline:
    """Steps computed in order on a thread, ``delay_s`` each, like a real stage: a row sent ahead takes the
    token its followed step sampled for its slot (token = 10 + position, EOS at ``eos_at``)."""

    def __init__(self, delay_s: float = 0.003, eos_at: int | None = None) -> None:
        import queue

        self.delay_s, self.eos_at = delay_s, eos_at
        self.work: queue.Queue = queue.Queue()
        self.sampled: dict[int, dict[int, int]] = {}
        self.steps: list[list[tuple[int, int, list[int], int]]] = []
        self.most_in_flight = 0
        threading.Thread(target=self._run, daemon=True).start()

    def __call__(self, msg: node_pb2.StepMessage) -> Future:
        done: Future = Future()
        self.work.put((msg, done))
        self.most_in_flight = max(self.most_in_flight, self.work.qsize())
        return done

    def _run(self) -> None:
        import time

        while True:
            msg, done = self.work.get()
            time.sleep(self.delay_s)
            result = node_pb2.StepResult(step_id=msg.step_id)
            row_log, sampled = [], {}
            for s in msg.sequences:
                ids = list(s.token_ids)
                if s.after_step:
                    assert not ids, "a row sent ahead carries no token"
                    ids = [self.sampled[s.after_step][s.slot]]  # KeyError: it followed a step it was not in
                row_log.append((s.slot, s.start, ids, s.after_step))
                pos = s.start + len(ids)
                tok = EOS if pos == self.eos_at else 10 + pos
                sampled[s.slot] = tok
                result.tokens.add(request_id=s.request_id, slot=s.slot, token_id=tok)
            self.sampled[msg.step_id] = sampled
            self.steps.append(row_log)
            done.set_result(result)


def run_all(s: Scheduler, reqs: list[Request]) -> dict[str, list[int]]:
    for r in reqs:
        s.submit(r)
    out = {}
    for r in reqs:
        events = collect(r)
        assert events[-1].error is None, events[-1].error
        out[r.request_id] = [t for e in events for t in e.token_ids]
    return out


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_lookahead_gives_the_same_tokens_with_rows_sent_ahead(batch: int, depth: int) -> None:
    outputs = {}
    for lookahead in (0, depth):
        s = Scheduler(eos_ids={EOS}, lookahead=lookahead)
        pipe = OrderedPipeline()
        s.set_pipeline(pipe, epoch=1, num_slots=8)
        outputs[lookahead] = run_all(s, [request(f"r{i}", prompt_len=3 + i, max_tokens=12) for i in range(batch)])
        ahead_rows = [row for step in pipe.steps for row in step if row[3]]
        s.stop()
        if lookahead:
            assert len(ahead_rows) >= batch * 8  # most decode rows went ahead of their previous step
            assert pipe.most_in_flight >= 1 + depth  # a request is in up to 1 + depth steps at once
        else:
            assert not ahead_rows
        rows_per_slot = {}
        for step in pipe.steps:
            for slot, *_ in step:
                rows_per_slot[slot] = rows_per_slot.get(slot, 0) + 1
        # one prefill row and 11 decode rows each: nothing is sent ahead past max_tokens
        assert sorted(rows_per_slot.values()) == [12] * batch
    assert outputs[0] == outputs[depth]
    assert outputs[depth]["r0"] == [10 + p for p in range(3, 15)]


def test_lookahead_is_bounded() -> None:
    with pytest.raises(ValueError, match="lookahead"):
        Scheduler(eos_ids={EOS}, lookahead=defaults.MAX_LOOKAHEAD + 1)


@pytest.mark.parametrize("depth", [1, 2])
def test_lookahead_drops_the_row_after_an_eos_and_reuses_the_slot(depth: int) -> None:
    s = Scheduler(eos_ids={EOS}, lookahead=depth)
    pipe = OrderedPipeline(eos_at=6)  # the token at position 6 is EOS: a prompt of 4 ends after 3 tokens
    s.set_pipeline(pipe, epoch=1, num_slots=1)  # one slot: the second request waits for it
    out = run_all(s, [request("a", prompt_len=4, max_tokens=10), request("b", prompt_len=2, max_tokens=3)])
    s.stop()
    assert out["a"] == [14, 15, EOS]
    assert out["b"] == [12, 13, 14]
    # a's row sent ahead of the step that sampled its EOS (the row at position 6) ran and was dropped;
    # then b prefilled the slot from position 0
    starts = [(start, ahead) for step in pipe.steps for _, start, _, ahead in step]
    stale = next(i for i, (start, ahead) in enumerate(starts) if start == 6 and ahead)
    assert (0, 0) in starts[stale + 1:]
