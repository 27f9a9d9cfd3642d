"""engine.logs: the text format people read (unchanged without fields) and the opt-in JSON lines."""

from __future__ import annotations

import json
import re
from datetime import datetime

import pytest

from engine.logs import ENV_FORMAT, log_line

CLOCK = r"\d\d:\d\d:\d\d\.\d{3}"


def test_text_without_fields_is_unchanged(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_FORMAT, raising=False)
    log_line("node", "joined 127.0.0.1:50051 as n1")
    monkeypatch.setenv(ENV_FORMAT, "text")
    log_line("coordinator", "serving")
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert re.fullmatch(rf"{CLOCK} \[node\] joined 127\.0\.0\.1:50051 as n1", lines[0])
    assert re.fullmatch(rf"{CLOCK} \[coordinator\] serving", lines[1])


def test_text_appends_fields_and_quotes_where_needed(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_FORMAT, raising=False)
    log_line("coordinator", "request finished", request_id="r-1", ttft_s=0.0421, error="stage 1 is gone",
             reason=None, empty="")
    log_line("node", "heartbeats failing", level="WARNING")
    first, second = capsys.readouterr().err.splitlines()
    assert re.fullmatch(rf'{CLOCK} \[coordinator\] request finished request_id=r-1 ttft_s=0\.0421 '
                        r'error="stage 1 is gone" reason=None empty=""', first)
    assert re.fullmatch(rf"{CLOCK} \[node\] WARNING: heartbeats failing", second)


def test_json_lines_carry_the_fields(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_FORMAT, "json")  # read at call time: set after import
    log_line("coordinator", "request admitted", request_id="abc123", prompt_tokens=17, node="n1")
    log_line("node", 'a "quoted"\nmessage', level="WARNING", ts="field named like a core key", path=object())
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert list(first)[:4] == ["ts", "level", "component", "msg"]
    assert first["level"] == "INFO" and first["component"] == "coordinator" and first["msg"] == "request admitted"
    assert (first["request_id"], first["prompt_tokens"], first["node"]) == ("abc123", 17, "n1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert abs((datetime.now().astimezone() - datetime.fromisoformat(first["ts"].replace("Z", "+00:00")))
               .total_seconds()) < 60
    assert second["msg"] == 'a "quoted"\nmessage' and second["level"] == "WARNING"
    assert second["ts_"] == "field named like a core key" and second["ts"] != second["ts_"]
    assert second["path"].startswith("<object object")  # an odd value is written as text, the line kept
