"""scripts/bench_gpu.py end to end on CPU (``--device cpu``, the "tiny" shape): run as users run it, from
the repo root, every system measured at two batch sizes; the JSON has every section with positive
times. No speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("hf", "engine", "cluster1", "cluster2")
REPEATS = 3
TINY_PARAMS = 106_816  # tests/engine/reference.py SHAPES["tiny"], embedding tied: 512*64 + 2 layers + norm


def test_bench_gpu_runs_every_system_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "scripts/bench_gpu.py", "--device", "cpu", "--shapes", "tiny", "--batch-sizes", "1,2",
           "--tokens", "16", "--repeats", f"{REPEATS}", "--copy-mib", "16", "--workdir", str(tmp_path / "work"),
           "--out", str(out)]
    # One thread per process: on a busy 2-core machine, a parallel region waiting for a stolen core makes
    # single timings jump by tens of ms, more than the decode steps of this tiny model take.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["errors"] == [] and report["elapsed_s"] > 0
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    assert report["settings"]["batch_sizes"] == [1, 2] and report["settings"]["tokens"] == 16
    copy = report["copy"]
    assert copy["buffer_bytes"] == 16 << 20 and copy["best_s"] > 0
    assert copy["bandwidth_gb_s"] == pytest.approx(2 * copy["buffer_bytes"] / copy["best_s"] / 1e9)

    tiny = report["shapes"]["tiny"]
    assert tiny["params"] == TINY_PARAMS and tiny["weight_bytes"] == 2 * TINY_PARAMS  # bf16
    assert tiny["untied_embedding_bytes"] == 0
    assert tiny["roofline_ms"] == pytest.approx(tiny["weight_bytes"] / (copy["bandwidth_gb_s"] * 1e9) * 1e3)
    assert list(tiny["systems"]) == list(SYSTEMS)
    for name, system in tiny["systems"].items():
        assert system["load_s"] >= 0 and system["section_s"] > 0, name
        assert set(system["batches"]) == {"1", "2"}, name
        for batch, row in system["batches"].items():
            assert len(row["t1_s"]) == len(row["tN_s"]) == REPEATS and min(row["t1_s"] + row["tN_s"]) > 0, (name, batch)
            assert row["ms_per_step"] > 0 and row["t1_ms"] > 0 and row["pct_of_roofline"] > 0, (name, batch)
            assert row["tokens_per_s"] == pytest.approx(int(batch) * 1e3 / row["ms_per_step"])
            if name != "hf":
                assert row["ttft_ms"] > 0 and row["ttft_max_ms"] >= row["ttft_ms"], (name, batch)
    assert tiny["systems"]["cluster1"]["stages"] == 1 and tiny["systems"]["cluster2"]["stages"] == 2
    for batch in ("1", "2"):
        assert set(tiny["ratios"][batch]) == {"engine_over_hf", "cluster2_over_cluster1", "cluster1_over_engine",
                                              "cluster1_over_hf"}
        assert all(r > 0 for r in tiny["ratios"][batch].values())

    table = proc.stdout
    assert "| shape | batch | system | roofline ms | ms/step | tokens/s | % of roofline |" in table
    assert sum(line.startswith("| tiny |") for line in table.splitlines()) == len(SYSTEMS) * 2 + 2
    assert "cluster2 done in" in proc.stderr  # progress with section times


@pytest.mark.parametrize("bad", [["--systems", "hf,vllm"], ["--shapes", "llama-9b"], ["--tokens", "1"],
                                 ["--prompt-tokens", "500", "--tokens", "64"], ["--batch-sizes", "1,x"]])
def test_bench_gpu_refuses_bad_arguments(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from scripts import bench_gpu

    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.parse_args(["--device", "cpu", *bad])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
