"""Bad input to ``tensorfleet-generate`` ends with one clear line on stderr and exit code 2, never a
traceback: missing paths, directories without a config, unsupported architectures, truncated or
corrupted safetensors and GGUF files, a tensor-parallel size that does not divide the heads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.model_source import embedded_gguf_path
from tests.engine.reference import make_random_model

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> str:
    code = main(["--max-tokens", "2", *argv, "hello"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("tensorfleet-generate: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_model("llama-gqa-tied", tmp_path_factory.mktemp("tiny") / "m")


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_path(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert "does not exist" in run_cli(capsys, "--model", str(tmp_path / "nope"))


def test_directory_without_config(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert "config.json" in run_cli(capsys, "--model", str(tmp_path))


def test_unsupported_architecture(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model / "config.json").write_text(json.dumps(cfg))
    err = run_cli(capsys, "--model", str(model))
    assert "unsupported architecture" in err and "gpt2" in err


def test_truncated_safetensors(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert "truncated" in run_cli(capsys, "--model", str(model))


def test_corrupted_safetensors_header(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    weights.write_bytes(bytes(data))
    assert "not a valid safetensors file" in run_cli(capsys, "--model", str(model))


def test_truncated_gguf(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    gguf = tmp_path / "cut.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        gguf.write_bytes(f.read(2_000_000))
    err = run_cli(capsys, "--model", str(gguf))
    assert "not a valid GGUF file" in err or "truncated" in err


def test_corrupted_gguf_magic(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    gguf = tmp_path / "bad.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        gguf.write_bytes(b"XXXX" + f.read(1_000_000)[4:])
    assert "GGUF" in run_cli(capsys, "--model", str(gguf))


def test_tp_that_does_not_divide_heads(capsys: pytest.CaptureFixture, tiny_model: Path) -> None:
    err = run_cli(capsys, "--model", str(tiny_model), "--tp", "3")
    assert "num_attention_heads=4 is not divisible by tp=3" in err


def test_bad_sampling_parameter(capsys: pytest.CaptureFixture, tiny_model: Path) -> None:
    assert "top_p=2.0" in run_cli(capsys, "--model", str(tiny_model), "--top-p", "2")


def test_subprocess_prints_one_line_not_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr
