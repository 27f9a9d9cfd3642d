"""A set of concurrent streaming requests that records every token's arrival: the load of the fault
benchmark and the fault tests.

Request i sends ``prompts[i % len(prompts)]`` with ``max_tokens`` (EOS ignored, so every request has the
same length); ``seeded`` requests sample (temperature 0.8, top-p 0.95, seed 1000 + i), the others are
greedy. ``seeded`` is a set of request indices, so one workload can mix both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class Record:
    index: int
    tokens: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # wall-clock time of each token
    finish: str | None = None
    error: str | None = None

    @property
    def lost(self) -> bool:
        return self.error is not None or self.finish is None


class StreamingWorkload:
    def __init__(self, address: str, prompts: Sequence[str], *, count: int, max_tokens: int,
                 seeded: Iterable[int] = (), tag: str = "w", timeout: float = 300.0) -> None:
        self.address, self.prompts, self.count, self.max_tokens = address, list(prompts), count, max_tokens
        self.seeded, self.tag, self.timeout = set(seeded), tag, timeout
        self.records = [Record(i) for i in range(count)]
        self.tokens = 0
        self.progress = threading.Condition()
        self.threads: list[threading.Thread] = []

    def start(self) -> StreamingWorkload:
        self.threads = [threading.Thread(target=self._run, args=(r,), daemon=True) for r in self.records]
        for t in self.threads:
            t.start()
        return self

    def join(self) -> StreamingWorkload:
        deadline = time.monotonic() + self.timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return self

    def run(self) -> StreamingWorkload:
        return self.start().join()

    def wait_tokens(self, n: int, timeout: float | None = None) -> bool:
        """Until the requests together received ``n`` tokens."""
        with self.progress:
            return self.progress.wait_for(lambda: self.tokens >= n, timeout or self.timeout)

    def outputs(self) -> list[list[int]]:
        return [r.tokens for r in self.records]

    def lost(self) -> list[Record]:
        return [r for r in self.records if r.lost]

    def _run(self, rec: Record) -> None:
        from client.api import ClientError, TensorfleetClient

        seeded = rec.index in self.seeded
        try:
            with TensorfleetClient(self.address, timeout=self.timeout) as client:
                for delta in client.generate_stream(
                        self.prompts[rec.index % len(self.prompts)], max_tokens=self.max_tokens, ignore_eos=True,
                        temperature=0.8 if seeded else 0.0, top_p=0.95 if seeded else 1.0,
                        seed=1000 + rec.index if seeded else None, request_id=f"{self.tag}-{rec.index}"):
                    now = time.time()
                    with self.progress:
                        rec.tokens.extend(delta.token_ids)
                        rec.arrivals.extend([now] * len(delta.token_ids))
                        self.tokens += len(delta.token_ids)
                        self.progress.notify_all()
                    if delta.finish_reason:
                        rec.finish = delta.finish_reason
        except ClientError as e:
            rec.error = f"{e.code}: {e.details}"
