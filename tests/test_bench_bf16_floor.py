"""scripts/bench_bf16_floor.py end to end on the tiny shape: the JSON holds the comparison, and the bf16
logits are close to the fp32 ones (and not equal: 16-bit arithmetic moved them)."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.bench_bf16_floor import main


def test_bf16_floor_on_the_tiny_shape(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    assert main(["--shape", "tiny", "--chunk", "1", "--prompts", "2", "--prompt-tokens", "8",
                 "--workdir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["against"] == "float32" and result["positions"] == 16
    assert 0 < result["rel_error"] < 0.05 and result["top1_agree"] >= 0.8
