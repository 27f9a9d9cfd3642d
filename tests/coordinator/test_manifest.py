"""The model manifest (header info, per-tensor sha256, fingerprint, hash sidecar) and the weight stream."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from coordinator import manifest as manifest_mod
from coordinator.manifest import MAX_CHUNK_BYTES, WeightServer, build_manifest, fingerprint
from engine.errors import ModelLoadError
from engine.weights import WeightReader


def _save_llama(directory: Path, **save_kwargs: object) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    model.save_pretrained(directory, **save_kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    single = tmp_path_factory.mktemp("llama")
    sharded = tmp_path_factory.mktemp("llama-sharded")
    return {"single": (single, _save_llama(single)),
            "sharded": (sharded, _save_llama(sharded, max_shard_size="100KB"))}


@pytest.fixture
def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = manifest_mod._hash_range

    def counting(*args: object, **kwargs: object) -> str:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(manifest_mod, "_hash_range", counting)
    return calls


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_entries_match_headers_and_hashes_match_tensor_bytes(layout: str, models: dict, tmp_path: Path) -> None:
    model_dir, state = models[layout]
    if layout == "sharded":
        assert len(list(model_dir.glob("*.safetensors"))) >= 2
    m = build_manifest(model_dir, name="tiny", progress=False, cache_dir=tmp_path)
    reader = WeightReader(model_dir)
    assert m.name == "tiny"
    assert m.config_json == (model_dir / "config.json").read_text()
    assert sorted(e.name for e in m.tensors) == sorted(reader.names())
    for e in m.tensors:
        info = reader.info(e.name)
        assert (e.dtype, tuple(e.shape), e.nbytes) == (info.dtype, info.shape, info.nbytes)
        assert e.sha256 == hashlib.sha256(_tensor_bytes(state[e.name])).hexdigest(), e.name
    assert m.fingerprint == fingerprint({e.name: e.sha256 for e in m.tensors})
    lines = "".join(f"{e.name}:{e.sha256}\n" for e in sorted(m.tensors, key=lambda e: e.name))
    assert m.fingerprint == hashlib.sha256(lines.encode()).hexdigest()


def test_fingerprint_changes_when_a_weight_changes(models: dict, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(models["single"][0], model_dir)
    cache = tmp_path / "cache"
    before = build_manifest(model_dir, name="tiny", progress=False, cache_dir=cache)
    assert build_manifest(model_dir, name="tiny", progress=False, cache_dir=cache).fingerprint == before.fingerprint

    file = model_dir / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    stat = file.stat()
    save_file(tensors, str(file), metadata={"format": "pt"})
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new mtime, whatever the clock

    after = build_manifest(model_dir, name="tiny", progress=False, cache_dir=cache)  # the sidecar is stale
    assert after.fingerprint != before.fingerprint
    changed = {e.name for e, f in zip(before.tensors, after.tensors, strict=True) if e.sha256 != f.sha256}
    assert changed == {"model.layers.1.mlp.up_proj.weight"}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_sidecar_avoids_rehashing(layout: str, models: dict, tmp_path: Path, count_hashes: list[int],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, _ = models[layout]
    monkeypatch.setenv("TENSORFLEET_CACHE", str(tmp_path / "env-cache"))  # the default, read at call time
    first = build_manifest(model_dir, name="tiny", progress=False)
    assert count_hashes[0] == len(first.tensors)
    assert list((tmp_path / "env-cache" / "manifest-hashes").glob("*.json"))
    count_hashes[0] = 0
    second = build_manifest(model_dir, name="tiny", progress=False)
    assert count_hashes[0] == 0
    assert second == first


def test_touching_one_shard_rehashes_only_its_tensors(models: dict, tmp_path: Path, count_hashes: list[int]) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(models["sharded"][0], model_dir)
    first = build_manifest(model_dir, name="tiny", progress=False, cache_dir=tmp_path / "cache")
    shard = sorted(model_dir.glob("*.safetensors"))[0]
    in_shard = WeightReader(model_dir)
    expected = sum(1 for n in in_shard.names() if in_shard.info(n).file == shard)
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    count_hashes[0] = 0
    again = build_manifest(model_dir, name="tiny", progress=False, cache_dir=tmp_path / "cache")
    assert count_hashes[0] == expected > 0
    assert again == first


def test_unwritable_cache_dir_still_builds(models: dict, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # mkdir under a file fails: the sidecar cannot be written
    m = build_manifest(models["single"][0], name="tiny", progress=False, cache_dir=blocker / "cache")
    assert len(m.tensors) == len(WeightReader(models["single"][0]).names())


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        build_manifest(tmp_path, name="x", progress=False, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_chunks_reassemble_to_the_exact_bytes(layout: str, models: dict, tmp_path: Path) -> None:
    model_dir, state = models[layout]
    m = build_manifest(model_dir, name="tiny", progress=False, cache_dir=tmp_path)
    server = WeightServer(model_dir, m)
    names = ["model.layers.2.mlp.down_proj.weight", "model.norm.weight", "model.embed_tokens.weight"]
    chunks = list(server.chunks(names, chunk_bytes=1000))
    assert list(dict.fromkeys(c.name for c in chunks)) == names  # tensors in request order
    parts: dict[str, bytearray] = defaultdict(bytearray)
    for c in chunks:
        assert len(c.data) <= 1000
        assert c.offset == len(parts[c.name])  # contiguous, in order
        assert c.total == state[c.name].numel() * state[c.name].element_size()
        parts[c.name] += c.data
    for name in names:
        assert bytes(parts[name]) == _tensor_bytes(state[name])
        entry = next(e for e in m.tensors if e.name == name)
        assert hashlib.sha256(parts[name]).hexdigest() == entry.sha256


def test_bad_requests_raise_before_streaming(models: dict, tmp_path: Path) -> None:
    model_dir, _ = models["single"]
    m = build_manifest(model_dir, name="tiny", progress=False, cache_dir=tmp_path)
    server = WeightServer(model_dir, m)
    with pytest.raises(ValueError, match="model.layers.7.mlp.up_proj.weight"):
        server.chunks(["model.norm.weight", "model.layers.7.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="named twice"):
        server.chunks(["model.norm.weight", "model.norm.weight"])
    for bad in (0, MAX_CHUNK_BYTES + 1):
        with pytest.raises(ValueError, match="chunk_bytes"):
            server.chunks(["model.norm.weight"], chunk_bytes=bad)
    small = WeightServer(model_dir, m, max_names=1, max_bytes=1024)
    with pytest.raises(ValueError, match="at most 1 per request"):
        small.chunks(["model.norm.weight", "model.layers.0.input_layernorm.weight"])
    with pytest.raises(ValueError, match="at most 1024"):
        small.chunks(["model.embed_tokens.weight"])


def test_server_refuses_a_manifest_of_another_checkpoint(models: dict, tmp_path: Path) -> None:
    m = build_manifest(models["single"][0], name="tiny", progress=False, cache_dir=tmp_path)
    m.tensors.add(name="model.layers.9.mlp.up_proj.weight", dtype="F32", shape=[1], nbytes=4, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="model.layers.9.mlp.up_proj.weight"):
        WeightServer(models["single"][0], m)
