"""scripts/bench_load.py end to end, small: 8 streaming clients for a few seconds against a 2-node
cluster of a tiny random model; no errors, every process alive, RSS samples recorded."""

from __future__ import annotations

import json
from pathlib import Path

from scripts import bench_load


def test_a_short_load_run_reports_no_errors_and_memory(tmp_path: Path) -> None:
    from tests.engine.reference import make_random_model

    model = make_random_model("llama-gqa-tied", tmp_path / "m")
    out = tmp_path / "load.json"
    code = bench_load.main(["--clients", "8", "--duration", "3", "--warmup", "1", "--sample-every", "1",
                            "--model", str(model), "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report["errors"]
    assert report["requests"] > 8 and report["tokens"] == report["requests"] * 16
    assert set(report["rss"]) == {"coordinator", "node0", "node1"} and len(report["samples"]) >= 3
    assert all(s["node0_rss_mib"] > 50 for s in report["samples"])
