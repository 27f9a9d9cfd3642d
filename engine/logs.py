"""Log lines of every process (stderr): when, who (a tag), what, and any key=value fields.

Text by default, for people: ``12:03:04.567 [coordinator] request finished request_id=r1 ...``.
With TENSORFLEET_LOG_FORMAT=json, one JSON object per line, for log collectors:
``{"ts": "2025-01-02T12:03:04.567Z", "level": "INFO", "component": "coordinator", "msg": ..., "request_id": "r1"}``.
The variable is read at each call, so launchers and tests may set it after import.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone

ENV_FORMAT = "TENSORFLEET_LOG_FORMAT"
_CORE = ("ts", "level", "component", "msg")


def log_line(tag: str, msg: str, *, level: str = "INFO", **fields: object) -> None:
    """Write one log line; ``fields`` become JSON keys, or ``key=value`` after the text message."""
    now = time.time()
    if os.environ.get(ENV_FORMAT, "").strip().lower() == "json":
        line = _json_line(now, tag, msg, level, fields)
    else:  # anything but "json" (unset, "text", a typo): a log line must never fail over its format
        line = _text_line(now, tag, msg, level, fields)
    print(line, file=sys.stderr, flush=True)


def _text_line(now: float, tag: str, msg: str, level: str, fields: dict[str, object]) -> str:
    clock = f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d}"
    head = f"{clock} [{tag}] {msg}" if level == "INFO" else f"{clock} [{tag}] {level}: {msg}"
    return head + "".join(f" {key}={_text_value(value)}" for key, value in fields.items())


def _text_value(value: object) -> str:
    text = str(value)
    # Quoted where a reader (or a grep) could not tell where the value ends.
    if not text or any(c.isspace() or c in '="' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _json_line(now: float, tag: str, msg: str, level: str, fields: dict[str, object]) -> str:
    ts = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    record: dict[str, object] = {"ts": ts, "level": level, "component": tag, "msg": msg}
    for key, value in fields.items():
        record[f"{key}_" if key in _CORE else key] = value  # a field never hides the line's own keys
    # default=str: an odd value (a Path, an enum) is written as text rather than losing the line.
    return json.dumps(record, ensure_ascii=False, default=str)


def dump_stacks_on_signal() -> None:
    """``kill -USR1 PID`` writes every thread's Python stack to stderr (the process's log): how to see
    where a hung process waits. Processes of a cluster call this at start."""
    import faulthandler
    import signal

    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (ValueError, OSError, AttributeError):  # stderr is no file (captured, redirected in-process)
        pass
