"""The coordinator's log lines (engine/logs.py)."""

from __future__ import annotations

from engine.logs import log_line


def log(msg: str) -> None:
    log_line("coordinator", msg)
