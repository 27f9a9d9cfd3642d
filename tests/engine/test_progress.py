"""engine.progress: a tqdm bar on a terminal, a bounded number of log lines elsewhere, nothing when off."""

from __future__ import annotations

import io
import re
import sys

import pytest

import engine.progress
from engine.logs import ENV_FORMAT
from engine.progress import progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _text_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_FORMAT, raising=False)


def test_off_a_terminal_a_bounded_number_of_lines(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.progress, "MIN_GAP_S", 0.0)  # as if each tenth took seconds
    total = 10 * 2**20
    with progress("fetching 3 tensors", total, tag="node") as bar:
        for _ in range(total // 1024):  # 10240 updates of 1 KiB
            bar.update(1024)
    lines = capsys.readouterr().err.splitlines()
    assert 9 <= len(lines) <= 11, lines  # a line per tenth (10%..90%), then the 100% line
    assert all("[node] fetching 3 tensors: " in line and "\r" not in line for line in lines)
    assert re.search(r"fetching 3 tensors: 100% \(10\.0 MiB of 10\.0 MiB in \d+\.\d s, [\d.]+ [KMG]?i?B/s\)$",
                     lines[-1]), lines[-1]
    percents = [int(re.search(r": (\d+)%", line).group(1)) for line in lines]
    assert percents == sorted(percents) and percents[0] >= 10


def test_a_fast_job_logs_only_its_end(capsys: pytest.CaptureFixture[str]) -> None:
    with progress("hashing small.gguf", 2**20) as bar:
        for _ in range(1024):
            bar.update(1024)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "hashing small.gguf: 100% (1.0 MiB of 1.0 MiB in " in lines[0]


def test_a_line_every_few_seconds_while_slow(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.progress, "MIN_GAP_S", 0.0)
    monkeypatch.setattr(engine.progress, "EVERY_S", 0.0)  # every update is "a few seconds" after the last line
    with progress("hashing x.gguf", 1000) as bar:
        for _ in range(5):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 6 and "hashing x.gguf: 0% (5 B of 1000 B" in lines[-2]
    assert "ended at 0%" in lines[-1]  # finished short of the total: said so, not "100%"


def test_a_failure_says_where_it_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), progress("fetching 1 tensors", 100, tag="node") as bar:
        bar.update(40)
        raise RuntimeError("stream broke")
    (line,) = capsys.readouterr().err.splitlines()[-1:]
    assert "[node] WARNING: fetching 1 tensors: stopped at 40% (40 B of 100 B" in line


def test_on_a_terminal_it_drives_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    with progress("writing 3 fp32 tensors", 3 * 2**20) as bar:
        for _ in range(3):
            bar.update(2**20)
    out = tty.getvalue()
    assert "writing 3 fp32 tensors:" in out and "\r" in out and "/3.00M" in out  # tqdm redraws (throttled)
    assert "[progress]" not in out  # a bar, not log lines


@pytest.mark.parametrize("tty", [False, True])
def test_off_or_empty_writes_nothing(tty: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = FakeTTY() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with progress("hashing", 100, enabled=False) as bar:
        bar.update(100)
    with progress("nothing to fetch", 0) as bar:
        pass
    assert stream.getvalue() == ""


def test_counts_other_than_bytes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.progress, "MIN_GAP_S", 0.0)
    with progress("loading layers 0-3", 4, unit="parts") as bar:
        for _ in range(4):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert "loading layers 0-3: 100% (4 of 4 parts in " in lines[-1] and lines[-1].endswith(" parts/s)")
    assert len(lines) == 4  # 25%, 50%, 75%, 100%
