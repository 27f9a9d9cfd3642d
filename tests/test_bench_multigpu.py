"""scripts/bench_multigpu.py end to end on CPU (``--device cpu``: gloo, CPU executors standing in for GPUs, the
"tiny" shape in fp32): the engine-level tensor-parallel comparison, the all-reduce timings and the
heterogeneous pipeline (a TP=2 stage and a TP=1 stage) run as users run them, from the repo root. TP=2 must
give TP=1's logits to fp32 rounding and the same greedy tokens; no speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tp_logits", "hetero", "allreduce")  # in the order the script runs them
SPECS = ("int8", "int8:rotate=true,outliers=3", "lowrank:rank=4")
ROWS = (1, 64)
PROMPTS, GREEDY_TOKENS = 3, 8


def test_bench_multigpu_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "multigpu.json"
    cmd = [sys.executable, "scripts/bench_multigpu.py", "--device", "cpu", "--shape", "tiny", "--dtype", "float32",
           "--sections", ",".join(SECTIONS), "--batch-sizes", "1,2", "--tokens", "8", "--prompt-tokens", "16",
           "--repeats", "1", "--logit-prompts", str(PROMPTS), "--logit-tokens", str(GREEDY_TOKENS),
           "--allreduce-specs", ";".join(SPECS), "--allreduce-tokens", ",".join(map(str, ROWS)),
           "--allreduce-iters", "3", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    # One thread per process: this machine has 2 cores and the run starts many processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["elapsed_s"] > 0
    assert report["machine"]["device"] == "cpu" and report["machine"]["devices_used"] == 2
    assert "scripts/bench_multigpu.py" in report["command"][1] and report["model"]["shape"] == "tiny"
    sections = report["sections"]
    assert list(sections) == list(SECTIONS) and all("error" not in s for s in sections.values())

    logits = sections["tp_logits"]
    assert set(logits["tp"]) == {"1", "2"} and logits["tp"]["1"]["load_s"] >= 0
    tp2 = logits["tp"]["2"]
    assert tp2["positions"] == PROMPTS * 16
    assert tp2["max_abs_diff"] < 1e-4 * max(1.0, tp2["max_abs_logit"]) and tp2["rel_error"] < 1e-5
    assert tp2["top1_agree"] == 1.0
    assert tp2["greedy"] == {"identical": PROMPTS, "of": PROMPTS, "first_divergence": [None] * PROMPTS}

    rows = sections["allreduce"]["rows"]
    assert sections["allreduce"]["hidden"] == 64
    assert {(r["spec"], r["tokens"]) for r in rows} == {(s, t) for s in ("all_reduce", *SPECS) for t in ROWS}
    for r in rows:
        assert r["median_us"] > 0 and r["min_us"] <= r["median_us"] <= r["max_us"], r
        assert r["bytes_sent_per_rank"] > 0 and r["time_vs_all_reduce"] > 0, r
    by = {(r["spec"], r["tokens"]): r for r in rows}
    assert by["all_reduce", 64]["rel_error"] < 1e-6 and not by["all_reduce", 64]["compressed"]
    assert by["all_reduce", 64]["bytes_sent_per_rank"] == 64 * 64 * 4  # fp32, 2 ranks: 2 (w-1)/w of it
    int8 = by["int8", 64]
    assert int8["compressed"] and not int8["default_compresses"]  # 4096 elements: below the default minimum
    assert 0 < int8["rel_error"] < 0.02 and int8["bytes_ratio"] > 1.5
    assert not by["lowrank:rank=4", 1]["compressed"]  # one row: low rank cannot save anything

    hetero = sections["hetero"]
    assert sorted(hetero["tp_per_stage"]) == [1, 2] and hetero["node_b_shares_device_0"] is False
    assert [len(s["members"]) for s in hetero["hetero"]["placement"]] == hetero["tp_per_stage"]
    assert hetero["tp1"]["placement"][0]["members"][0]["device"] == "cpu:0"
    for name in ("tp1", "hetero"):
        assert set(hetero[name]["batches"]) == {"1", "2"}, name
        for batch, row in hetero[name]["batches"].items():
            assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0, (name, batch)
    for batch, row in hetero["hetero"]["batches"].items():
        assert row["greedy_vs_tp1"]["identical"] == row["greedy_vs_tp1"]["of"] == int(batch)

    table = proc.stdout
    assert "| 2 |" in table and "| hetero |" in table and "| int8 | 64x64 |" in table
    assert "hetero: done in" in proc.stderr


@pytest.mark.parametrize("bad", [["--sections", "tp_logits,nvlink"], ["--shape", "llama-9b"],
                                 ["--batch-sizes", "1,x"], ["--allreduce-specs", "int9"],
                                 ["--prompt-tokens", "500"], ["--failover-dtypes", "int8"]])
def test_bench_multigpu_refuses_bad_arguments(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from scripts import bench_multigpu

    with pytest.raises(SystemExit) as exit_info:
        bench_multigpu.parse_args(["--device", "cpu", *bad])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
