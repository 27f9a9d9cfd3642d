"""scripts/bench_engine.py runs end to end and writes a complete JSON report.

A tiny random-init Llama (no tokenizer) keeps this to seconds; it also covers the token-id prompt
fallback. No timing is asserted beyond "the rates are positive numbers".
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_engine.py"


def _load_script():  # noqa: ANN202 - a module object
    spec = importlib.util.spec_from_file_location("bench_engine_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201 - a module object
    return _load_script()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(d)
    return d


def test_quick_run_writes_report(bench, tiny_model_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / "b.json"
    # A few more tokens and rounds than --quick alone: on a model this small t_N - t_1 is a few
    # milliseconds, and the medians keep background load from making it non-positive.
    rc = bench.main(["--quick", "--model", str(tiny_model_dir), "--new-tokens", "16", "--repeats", "3",
                     "--threads", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"machine", "settings", "raw", "results", "ratios", "agreement"} <= report.keys()
    assert {"cpu", "logical_cores", "torch", "threads", "dtype"} <= report["machine"].keys()
    assert report["machine"]["threads"] == 1
    settings = report["settings"]
    assert settings["batch_sizes"] == [1, 2] and settings["new_tokens"] == 16 and settings["repeats"] == 3
    assert "no tokenizer" in settings["prompt_source"]
    assert all(8 <= n <= 40 for n in settings["prompt_lengths"])
    for system in ("transformers", "engine"):
        for b in ("1", "2"):
            assert len(report["raw"][system][b]["t_n_s"]) == 3 and len(report["raw"][system][b]["t_1_s"]) == 3
    rows = {(r["system"], r["batch"]): r for r in report["results"]}
    assert set(rows) == {(s, b) for s in ("transformers", "engine") for b in (1, 2)}
    for row in rows.values():
        assert row["decode_tok_s"] > 0 and row["e2e_tok_s"] > 0 and row["ttft_ms"] > 0
        assert row["decode_tok_s_best"] > 0 and row["t_n_spread"] >= 1
    for name in ("decode_engine_over_transformers", "decode_best_engine_over_transformers"):
        ratios = report["ratios"][name]
        assert set(ratios) == {"1", "2"} and all(r > 0 for r in ratios.values())
    printed = capsys.readouterr()
    assert "engine/transformers decode tok/s" in printed.out
    assert "round 3/3" in printed.err  # progress goes to stderr


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "1,9"], "outside 1..8"),
    (["--batch-sizes", "one"], "comma-separated integers"),
    (["--new-tokens", "1"], "must be >= 2"),
    (["--repeats", "0"], "must be >= 1"),
])
def test_bad_arguments_fail_clearly(bench, argv: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_quick_defaults_and_explicit_flags(bench) -> None:
    args = bench.parse_args(["--quick"])
    assert (args.new_tokens, args.repeats, args.batch_sizes) == (8, 1, [1, 2])
    args = bench.parse_args(["--quick", "--new-tokens", "5"])
    assert args.new_tokens == 5
    args = bench.parse_args([])
    assert (args.new_tokens, args.repeats, args.batch_sizes, args.dtype) == (64, 3, [1, 8], "float32")


def test_several_engine_dtypes_in_one_run(bench, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    rc = bench.main(["--quick", "--model", str(tiny_model_dir), "--batch-sizes", "1", "--engine-dtypes",
                     "float32,bfloat16", "--threads", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["systems_order"] == ["transformers", "engine", "engine-bfloat16"]
    assert set(report["ratios"]["decode_over_transformers"]) == {"engine", "engine-bfloat16"}
    assert set(report["agreement"]) == {"engine", "engine-bfloat16"}
    ratios = report["ratios"]
    assert ratios["decode_engine_over_transformers"] == ratios["decode_over_transformers"]["engine"]


def test_unknown_engine_dtype(bench, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--engine-dtypes", "float32,int3"]) == 2
    assert "'int3' is not one of" in capsys.readouterr().err
