"""scripts/bench_serving.py: its helpers, its argument checks, and one --quick run end to end.

The end-to-end run starts a real local cluster (one CPU node) on the embedded model and a transformers
baseline; no timing is asserted beyond "the rates and the ratio are positive numbers".
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_serving.py"


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201 - a module object
    spec = importlib.util.spec_from_file_location("bench_serving_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_percentile_interpolates_between_ranks(bench) -> None:
    xs = [4.0, 1.0, 3.0, 2.0, None]  # unsorted; None (e.g. no TPOT for a 1-token request) is left out
    assert bench.percentile(xs, 0) == 1.0 and bench.percentile(xs, 100) == 4.0
    assert bench.percentile(xs, 50) == pytest.approx(2.5)
    assert bench.percentile(xs, 90) == pytest.approx(3.7)
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([], 50) is None and bench.percentile([None], 50) is None
    with pytest.raises(ValueError, match="outside 0..100"):
        bench.percentile(xs, 101)


def _record(bench, i: int, **changes):  # noqa: ANN202 - a record dict
    rec = bench.new_record(f"r{i}", i)
    rec.update(done=True, finals=1, finish_reason="length", tokens=4, token_ids=[1, 2, 3, 4], ttft_s=0.1 * (i + 1),
               e2e_s=0.4 * (i + 1), tpot_s=0.1 * (i + 1), max_gap_s=0.1)
    rec.update(changes)
    return rec


def test_summary_counts_completed_requests_and_rates(bench) -> None:
    records = [_record(bench, i) for i in range(4)] + [_record(bench, 9, error="ClientError: boom", tokens=0)]
    s = bench.summarize(records, wall_s=2.0)
    assert (s["requests"], s["completed"], s["output_tokens"]) == (5, 4, 16)
    assert s["tokens_per_s"] == 8.0 and s["requests_per_s"] == 2.0
    assert s["ttft_s"]["n"] == 4 and s["ttft_s"]["p50"] == pytest.approx(0.25)
    assert s["e2e_s"]["max"] == pytest.approx(1.6) and set(s["tpot_s"]) >= {"p50", "p90", "p99", "mean"}


def test_integrity_classifies_failures(bench) -> None:
    good = [_record(bench, i) for i in range(3)]
    assert bench.integrity(good, max_tokens=4, ignore_eos=True) | {"error_messages": []} == {
        "sent": 3, "lost": 0, "errors": 0, "duplicated": 0, "misrouted": 0, "wrong_length": 0, "ok": True,
        "error_messages": []}
    bad = [_record(bench, 0, finals=0), _record(bench, 1, done=False), _record(bench, 2, finals=2),
           _record(bench, 3, foreign=1), _record(bench, 4, tokens=3), _record(bench, 5, error="ClientError: x"),
           _record(bench, 6, error="ClientError: INTERNAL: ... ended the stream without a finish reason")]
    c = bench.integrity(bad, max_tokens=4, ignore_eos=True)
    assert (c["lost"], c["duplicated"], c["misrouted"], c["wrong_length"], c["errors"]) == (3, 1, 1, 1, 1)
    assert not c["ok"] and "ClientError: x" in c["error_messages"]
    assert bench.integrity([_record(bench, 0, tokens=2)], max_tokens=4, ignore_eos=False)["ok"]


def test_agreement_compares_up_to_the_clusters_first_eos(bench) -> None:
    # With EOS ignored the cluster generates EOS (2) and goes on; transformers' min_new_tokens masks it.
    records = [_record(bench, 0, token_ids=[5, 6, 2, 9]), _record(bench, 16, token_ids=[5, 6, 2, 9]),
               _record(bench, 1, token_ids=[7, 8, 9, 9])]
    baseline = {"eos_token_id": 2, "token_ids": [[5, 6, 4, 4], [7, 8, 9, 1]]}
    assert bench.agreement(records, baseline) == {"prompts_with_several_outputs": 0, "baseline_identical": 1,
                                                  "baseline_compared": 2}
    records.append(_record(bench, 32, token_ids=[5, 5, 5, 5]))  # prompt 0 again, another output
    assert bench.agreement(records, None) == {"prompts_with_several_outputs": 1}


def test_arrivals_are_seeded_poisson(bench) -> None:
    a = bench.arrival_times(10.0, 50.0, seed=3)
    assert a == bench.arrival_times(10.0, 50.0, seed=3) != bench.arrival_times(10.0, 50.0, seed=4)
    assert a == sorted(a) and 0 < a[0] and a[-1] < 50.0
    assert 400 < len(a) < 600  # mean 500


def test_defaults_and_quick(bench) -> None:
    args = bench.parse_args([])
    assert (args.concurrency, args.max_tokens, args.duration, args.ignore_eos) == ([1, 8, 32], 64, 60.0, True)
    assert (args.slots, args.baseline_batch, args.nodes, args.stages, args.rate) == (32, 32, 1, 1, None)
    args = bench.parse_args(["--quick", "--max-tokens", "5", "--no-ignore-eos"])
    assert (args.concurrency, args.max_tokens, args.duration, args.baseline_batch) == ([1, 2], 5, 5.0, 2)
    assert not args.ignore_eos


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0,2"], "must be >= 1"),
    (["--concurrency", "a"], "comma-separated integers"),
    (["--rate", "0"], "--rate=0.0 must be > 0"),
    (["--rate", "-1"], "must be > 0"),
    (["--duration", "0"], "--duration=0.0 must be > 0"),
    (["--max-tokens", "0"], "--max-tokens=0 must be >= 1"),
    (["--slots", "0"], "--slots=0 must be >= 1"),
    (["--concurrency", "1,4", "--baseline-batch", "3"], "must be one of the --concurrency levels"),
    (["--address", "127.0.0.1:1", "--nodes", "2"], "--nodes shape a local cluster"),
    (["--rate", "0.01", "--duration", "5"], "expects no arrival"),
])
def test_bad_arguments_fail_clearly(bench, argv: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unreachable_address(free_port: int, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--address", f"127.0.0.1:{free_port}", "--out",
                           str(tmp_path / "x.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot reach the coordinator" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_quick_run_end_to_end(embedded_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--model", str(embedded_model_dir), "--out",
                           str(out), "--plots-dir", str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["concurrency"] for row in report["closed_loop"]] == [1, 2]
    for row in [*report["closed_loop"], report["open_loop"]]:
        assert row["completed"] == row["requests"] > 0 and row["tokens_per_s"] > 0 and row["requests_per_s"] > 0
        assert row["ttft_s"]["p50"] > 0 and row["tpot_s"]["p99"] > 0 and row["e2e_s"]["p90"] > 0
    for phase in ("closed", "open"):
        checks = report["integrity"][phase]
        assert checks["lost"] == checks["duplicated"] == checks["errors"] == checks["misrouted"] == 0, checks
        assert checks["ok"]
    assert report["integrity"]["idle_after"] == {"running": 0, "waiting": 0}
    assert report["open_loop"]["arrivals"] == len(report["records"]["open"]) > 0
    assert all(r["tokens"] == 8 and r["finish_reason"] == "length" for r in report["records"]["open"])
    assert len({r["request_id"] for r in report["records"]["open"]}) == report["open_loop"]["arrivals"]
    ratio = report["ratio_cluster_over_transformers"]
    assert isinstance(ratio, float) and ratio > 0
    assert report["baseline"]["batch"] == 2 and report["baseline"]["tokens"] == 16
    assert {"platform", "cpu_count", "torch"} <= report["machine"].keys()
    assert report["agreement"]["baseline_compared"] == 2
    for name in ("throughput", "latency", "open_loop"):
        png = tmp_path / f"x_{name}.png"
        assert png.exists() and png.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert "integrity (open): " in proc.stdout and "ratio: cluster tok/s" in proc.stdout
