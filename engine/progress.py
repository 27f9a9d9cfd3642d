"""Progress of long jobs (hashing, converting, fetching weights): a bar on a terminal, log lines elsewhere.

tqdm redraws its bar with carriage returns. In a log file, CI output or a cluster's captured stderr
that is one unreadable run of redraws, so off a terminal the same progress becomes a plain log line
(engine/logs.py) at every tenth of the way and at least every few seconds: done, total and rate.

    with progress("fetching weights", total_bytes, tag="node", enabled=progress) as bar:
        for chunk in chunks:
            bar.update(len(chunk))
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from engine.logs import log_line

STEP = 0.1  # a log line at every tenth of the total
EVERY_S = 5.0  # and at least this often, so a stalled job still shows it is alive
MIN_GAP_S = 1.0  # but not more often: a job of a second or less logs only its last line


class Progress(Protocol):
    def update(self, n: int) -> None: ...


class _Quiet:
    def update(self, n: int) -> None:
        pass


def on_terminal() -> bool:
    """Whether stderr is a terminal, where a live bar reads well (read each call: tests and
    launchers swap stderr)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def progress(desc: str, total: int, *, unit: str = "B", tag: str = "progress",
             enabled: bool = True) -> Iterator[Progress]:
    """Report ``update(n)`` calls against ``total`` (in ``unit``: "B" for bytes, else what is counted):
    a tqdm bar when stderr is a terminal, log lines under ``tag`` otherwise, nothing if not
    ``enabled`` or when there is nothing to do."""
    if not enabled or total <= 0:
        yield _Quiet()
    elif on_terminal():
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                  file=sys.stderr, leave=False) as bar:
            yield bar
    else:
        lines = _LogLines(desc, total, unit=unit, tag=tag)
        try:
            yield lines
        except BaseException:
            lines.stopped()
            raise
        lines.finished()


class _LogLines:
    """Progress as a bounded number of log lines: one per tenth of the total and one per EVERY_S
    seconds without a line (but none within MIN_GAP_S of the last), and the last at 100% (or where
    the job stopped)."""

    def __init__(self, desc: str, total: int, *, unit: str, tag: str) -> None:
        self.desc, self.total, self.unit, self.tag = desc, total, unit, tag
        self.done = 0
        self.start = self.last_line = time.monotonic()
        self.next_step = STEP

    def update(self, n: int) -> None:
        self.done += n
        fraction = self.done / self.total
        now = time.monotonic()
        if fraction >= 1.0:
            return  # finished() writes the 100% line once, with the rate of the whole job
        since = now - self.last_line
        if since >= MIN_GAP_S and (fraction >= self.next_step or since >= EVERY_S):
            self.next_step = (int(fraction / STEP + 1e-9) + 1) * STEP
            self._line(now, _percent(self.done, self.total))

    def finished(self) -> None:
        done = "100%" if self.done >= self.total else f"ended at {_percent(self.done, self.total)}"
        self._line(time.monotonic(), done)

    def stopped(self) -> None:
        self._line(time.monotonic(), f"stopped at {_percent(self.done, self.total)}", level="WARNING")

    def _line(self, now: float, what: str, *, level: str = "INFO") -> None:
        self.last_line = now
        elapsed = now - self.start
        if self.unit == "B":
            amount = f"{_bytes(self.done)} of {_bytes(self.total)}"
            rate = f", {_bytes(self.done / elapsed)}/s" if elapsed > 0 else ""
        else:
            amount = f"{self.done} of {self.total} {self.unit}"
            rate = f", {self.done / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        log_line(self.tag, f"{self.desc}: {what} ({amount} in {elapsed:.1f} s{rate})", level=level)


def _percent(done: int, total: int) -> str:
    return f"{100 * done // total}%"  # rounded down: "100%" only once all is done


def _bytes(n: float) -> str:
    for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {name}"
    return f"{n:.0f} B"
