"""scripts/codec_table.py: the speedups it derives from bench_links JSON, and a --quick run end to end
(accuracy on the embedded model, no link runs) with a GPU link file added."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import codec_table

INT8 = "int8:rotate=true,outliers=3"


def _links(card: str | None = None) -> dict:
    rows = [{"codec": "exact", "rate": "100mbit", "ttft_512_s": 0.20, "decode_tok_s": 10.0},
            {"codec": INT8, "rate": "100mbit", "ttft_512_s": 0.10, "decode_tok_s": 9.0},
            {"codec": "exact", "rate": "1gbit", "ttft_512_s": 0.05, "decode_tok_s": 10.0},
            {"codec": "auto", "rate": "1gbit", "ttft_512_s": 0.10, "decode_tok_s": 11.0}]
    return {"rows": rows, "machine": {"gpu": card} if card else {}, "settings": {"shape": "llama-3.2-1b"}}


def test_speedups_are_against_exact_at_the_same_rate() -> None:
    got = codec_table.speedups(_links(), 512)
    assert got[(codec_table.canonical(INT8), "100mbit")] == pytest.approx({"ttft": 2.0, "decode": 0.9})
    assert got[(codec_table.canonical("auto"), "1gbit")] == pytest.approx({"ttft": 0.5, "decode": 1.1})
    assert got[("exact", "1gbit")] == pytest.approx({"ttft": 1.0, "decode": 1.0})


def test_quick_run_writes_a_table_with_the_gpu_columns(tmp_path: Path) -> None:
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps(_links("NVIDIA H200")))
    code = codec_table.main(["--quick", "--codecs", f"exact,{INT8},auto", "--out-dir", str(tmp_path / "out"),
                             "--gpu-links", str(gpu)])
    assert code == 0
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    head, rows = lines[0], [line for line in lines[2:] if line.startswith("| ")]
    assert "TTFT 512 @ 100mbit (NVIDIA H200, llama-3.2-1b)" in head and "KL mean" in head
    assert [r.split(" | ")[0] for r in rows] == ["| exact", f"| {INT8}", "| auto"]
    assert rows[0].split(" | ")[3] == "100.00%"  # exact agrees with itself everywhere
    assert rows[1].rstrip(" |").endswith("2.00x | -")  # the GPU speedup at 100 Mbit; no 1 Gbit row for it
    assert "as its codec" in rows[2]


def test_a_bad_codec_list_is_refused(capsys) -> None:  # noqa: ANN001
    assert codec_table.main(["--quick", "--codecs", "int8,,int4"]) == 2
    assert "empty item" in capsys.readouterr().err
