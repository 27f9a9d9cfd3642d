"""Log lines of every process: wall-clock time to the millisecond, a tag saying who, then what (stderr)."""

from __future__ import annotations

import sys
import time


def log_line(tag: str, msg: str) -> None:
    now = time.time()
    print(f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d} [{tag}] {msg}",
          file=sys.stderr, flush=True)
