"""scripts/bench_codecs.py: its argument checks, its helpers, and one --quick run end to end.

The end-to-end run loads the embedded model (2 stages, bf16 wire) and checks what must hold whatever
the accuracy turns out to be: the exact codec reproduces the baseline bit for bit, int8 sends 1.93x
fewer bytes than bf16 at hidden size 576, and every goal gets a verdict.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_codecs.py"


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201 - a module object
    spec = importlib.util.spec_from_file_location("bench_codecs_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_codec_list_splits_on_commas_between_specs(bench) -> None:
    assert bench.split_specs("exact, int8:block=64,rotate=true,int4") == ["exact", "int8:block=64,rotate=true", "int4"]
    assert bench.parse_codecs("int8,lowrank:rank=8") == ["int8:block=128,rotate=false",
                                                         "lowrank:rank=8,min_rate=1.0,error_feedback=false"]


def test_common_prefix_and_layer_ranges(bench) -> None:
    assert bench.common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert bench.common_prefix([1, 2], [1, 2]) == 2
    assert bench.layer_ranges(None, 2, 30) == [(0, 15), (15, 30)]
    assert bench.layer_ranges([10, 20], 3, 30) == [(0, 10), (10, 20), (20, 30)]


@pytest.mark.parametrize("argv, message", [
    (["--codecs", "bogus"], "unknown codec 'bogus'"),
    (["--codecs", "int8:block=0"], "block=0"),
    (["--codecs", "int8:bits=3"], "has no parameter 'bits'"),
    (["--codecs", "int8,int8:block=128"], "given twice"),
    (["--codecs", "rotate=true,int8"], "follows no 'name:' spec"),
    (["--codecs", "int8,,int4"], "empty item"),
    (["--stages", "1"], "must be >= 2"),
    (["--boundaries", "20,10"], "strictly increasing"),
    (["--boundaries", "ten"], "comma-separated layer indices"),
    (["--stages", "3", "--boundaries", "10"], "disagrees"),
    (["--greedy-tokens", "0"], "must be >= 1"),
    (["--threads", "0"], "must be >= 1"),
    (["--boundaries", "30"], "below the model's 30 layers"),  # checked against the model's config
    (["--stages", "31"], "exceeds the model's 30 layers"),
])
def test_bad_arguments_exit_2_with_a_message(bench, argv: list[str], message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([*argv, "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "bench_codecs: " in err and message in err
    assert not (tmp_path / "b.json").exists()


def test_unknown_wire_dtype_is_an_argparse_error(bench, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--wire-dtype", "int8"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_quick_run_writes_sane_report(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / "codecs.json"
    rc = bench.main(["--quick", "--codecs", "exact,int8,int4,lowrank:rank=8", "--threads", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    s = report["settings"]
    assert s["stages"] == 2 and s["layer_ranges"] == [[0, 15], [15, 30]] and s["wire_dtype"] == "bfloat16"
    assert s["passages"] == 2 and s["prompts"] == 2 and s["greedy_tokens"] == 8 and s["positions"] >= 60
    assert "(boundary, message kind)" in s["lowrank_state"]
    rows = {r["codec"]: r for r in report["results"]}
    assert list(rows) == ["exact (fp32 wire)", "exact", "int8:block=128,rotate=false", "int4:block=32,rotate=true",
                          "lowrank:rank=8,min_rate=1.0,error_feedback=false"]
    for r in rows.values():
        assert r["positions"] == s["positions"]
        assert r["kl_mean"] >= -1e-9 and r["kl_max"] >= r["kl_mean"] and 0 <= r["top1_agreement"] <= 1
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert 0 <= r["greedy"]["prefix_agreement_mean"] <= 1
        assert r["bytes"]["greedy_run"]["prefill"]["messages"] == 1  # both prompts in one prefill, one boundary
        assert r["bytes"]["greedy_run"]["decode"]["messages"] == 7  # then 7 decode steps for 8 tokens
        assert r["bytes"]["teacher_forced"]["messages"] == 2  # one per passage
    exact = rows["exact"]
    assert exact["kl_mean"] == 0 and exact["kl_max"] == 0 and exact["top1_agreement"] == 1.0
    assert exact["top1_disagreements"] == 0
    assert exact["bytes_ratio"] == {"prefill": 1.0, "decode": 1.0, "overall": 1.0}
    assert exact["perplexity_change_pct"] == 0 and exact["greedy"]["identical_prompts"] == 2
    assert exact["greedy"]["prefix_agreement_mean"] == 1.0
    assert rows["exact (fp32 wire)"]["bytes_ratio"]["overall"] == 0.5  # twice the bytes of bf16
    int8 = rows["int8:block=128,rotate=false"]["bytes_ratio"]
    assert all(1.9 < int8[k] < 1.94 for k in int8)  # 576 / (576 + 4 * 5) per row
    int4 = rows["int4:block=32,rotate=true"]["bytes_ratio"]
    assert all(3.5 < int4[k] < 3.6 for k in int4)  # 1152 / (288 + 2 * 18)
    lowrank = rows["lowrank:rank=8,min_rate=1.0,error_feedback=false"]
    decode = lowrank["bytes"]["greedy_run"]["decode"]
    assert decode["sent_exact"] == decode["messages"] and lowrank["bytes_ratio"]["decode"] == 1.0  # 2 rows
    assert lowrank["bytes_ratio"]["prefill"] > 1
    goals = {g["codec"]: g for g in report["goals"]}
    assert set(goals) == {"int8:block=128,rotate=false", "int4:block=32,rotate=true"}
    assert all(isinstance(g["met"], bool) and g["met"] == (not g["misses"]) for g in goals.values())
    assert report["lowrank_notes"]
    printed = capsys.readouterr()
    assert "| codec | bytes ratio vs bfloat16" in printed.out and "Goals:" in printed.out
    assert "int8:block=128,rotate=false: int8: >= 1.9x" in printed.out
    assert "teacher-forced passage 2/2" in printed.err and "greedy exact (baseline)" in printed.err
