"""The coordinator's log lines (engine/logs.py)."""

from __future__ import annotations

from engine.logs import log_line


def log(msg: str, *, level: str = "INFO", **fields: object) -> None:
    log_line("coordinator", msg, level=level, **fields)
