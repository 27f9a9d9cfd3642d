"""The coordinator's log lines: wall-clock time to the millisecond, then what happened (to stderr)."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    now = time.time()
    print(f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d} [coordinator] {msg}",
          file=sys.stderr, flush=True)
