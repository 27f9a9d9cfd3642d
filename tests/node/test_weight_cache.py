"""Fetching a stage's tensors from the coordinator over gRPC into the node's content-addressed cache,
and loading a stage from that cache exactly as from the model directory."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch

from coordinator.manifest import WeightServer, build_manifest
from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.model_source import load_hf_config
from engine.stage import StageModel
from engine.weights import WeightReader
from node.weight_cache import CachedWeightReader, TensorCache, fetch_missing, stage_tensor_names
from tensorfleet.v1 import coordinator_pb2, coordinator_pb2_grpc

NUM_LAYERS = 3


def _save_llama(directory: Path, *, dtype: torch.dtype = torch.float32, tied: bool = False) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tied)
    LlamaForCausalLM(config).to(dtype).save_pretrained(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, coordinator_pb2.ModelManifest]]:
    out = {}
    for key, kwargs in {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "tied": {"tied": True}}.items():
        model_dir = tmp_path_factory.mktemp(key)
        _save_llama(model_dir, **kwargs)
        cache_dir = tmp_path_factory.mktemp(f"{key}-hashes")
        out[key] = (model_dir, build_manifest(model_dir, name=key, progress=False, cache_dir=cache_dir))
    return out


class Servicer(coordinator_pb2_grpc.CoordinatorServicer):
    """GetManifest and FetchWeights over a WeightServer; ``tamper`` rewrites the outgoing chunk list."""

    def __init__(self, model_dir: Path, manifest: coordinator_pb2.ModelManifest, tamper=None) -> None:
        self.manifest, self.weights, self.tamper = manifest, WeightServer(model_dir, manifest), tamper
        self.requests: list[list[str]] = []

    def GetManifest(self, request, context):  # noqa: N802 (gRPC's method name)
        return self.manifest

    def FetchWeights(self, request, context):  # noqa: N802
        self.requests.append(list(request.names))
        try:
            chunks = self.weights.chunks(list(request.names), chunk_bytes=4096)
        except ValueError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        yield from (self.tamper(list(chunks)) if self.tamper else chunks)


@contextmanager
def serve(servicer: Servicer) -> Iterator[coordinator_pb2_grpc.CoordinatorStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield coordinator_pb2_grpc.CoordinatorStub(channel)
    finally:
        server.stop(grace=None)


def _stage_names(manifest: coordinator_pb2.ModelManifest, start: int, end: int) -> list[str]:
    return stage_tensor_names(manifest, json.loads(manifest.config_json), start, end, NUM_LAYERS)


@pytest.mark.parametrize("key", ["fp32", "bf16"])
def test_middle_stage_fetch_reads_like_the_model_dir(key: str, models: dict, tmp_path: Path) -> None:
    model_dir, manifest = models[key]
    servicer = Servicer(model_dir, manifest)
    cache = TensorCache(tmp_path / "cache")
    with serve(servicer) as stub:
        got = stub.GetManifest(coordinator_pb2.ManifestRequest())
        assert got == manifest
        names = _stage_names(got, 1, 2)
        assert names and all(".layers.1." in n for n in names)
        fetched = fetch_missing(stub, got, names, cache, node_id="n1", progress=False)
        unique = {e.sha256: e.nbytes for e in got.tensors if e.name in names}
        # Identical tensors (the freshly initialized norms are all ones) are fetched and stored once.
        assert fetched == sum(unique.values()) == cache.bytes_used()
        assert len(servicer.requests[0]) == len(unique) < len(names)
        assert fetch_missing(stub, got, names, cache, node_id="n1", progress=False) == 0  # rejoin: a cache hit
        assert len(servicer.requests) == 1
    assert all(cache.verify(sha) for sha in unique)

    cached, reference = CachedWeightReader(got, cache, names), WeightReader(model_dir)
    assert sorted(cached.names()) == sorted(names)
    assert "model.norm.weight" not in cached
    for name in names:
        assert cached.shape(name) == reference.shape(name)
        assert cached.dtype(name) == reference.dtype(name) == (torch.bfloat16 if key == "bf16" else torch.float32)
        assert cached.nbytes([name]) == reference.nbytes([name])
        assert torch.equal(cached.get(name), reference.get(name))
        assert torch.equal(cached.get(name, dtype=torch.float32), reference.get(name, dtype=torch.float32))
        rows, cols = (*reference.shape(name), 1)[:2]
        for dim, size in ((0, rows), (1, cols)):
            if dim < len(reference.shape(name)):
                for start, stop in ((0, size), (1, size // 2 + 1), (size // 2, size), (2, 2)):
                    a = cached.get_slice(name, dim, start, stop)
                    assert torch.equal(a, reference.get_slice(name, dim, start, stop)), (name, dim, start, stop)
                    assert a.is_contiguous()


@pytest.mark.parametrize("key", ["fp32", "bf16", "tied"])
def test_stages_load_from_the_cache_like_from_the_dir(key: str, models: dict, tmp_path: Path) -> None:
    model_dir, manifest = models[key]
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    dtype = torch.bfloat16 if key == "bf16" else torch.float32
    cache = TensorCache(tmp_path / "cache")
    with serve(Servicer(model_dir, manifest)) as stub:
        for start, end in ((0, 1), (1, 2), (2, 3)):
            names = _stage_names(manifest, start, end)
            fetch_missing(stub, manifest, names, cache, progress=False)
            from_cache = StageModel(cfg, start=start, end=end, dtype=dtype)
            from_cache.load(CachedWeightReader(manifest, cache, names))
            from_dir = StageModel.from_pretrained(model_dir, start=start, end=end, dtype=dtype)
            a, b = from_cache.state_dict(), from_dir.state_dict()
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (start, end, k)


def _flip_a_byte(chunks: list[coordinator_pb2.WeightChunk]) -> list[coordinator_pb2.WeightChunk]:
    data = bytearray(chunks[-1].data)
    data[0] ^= 0x01
    chunks[-1].data = bytes(data)
    return chunks


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (_flip_a_byte, "checksum mismatch for model.layers.1.self_attn.q_proj.weight: the coordinator's copy differs"),
        (lambda chunks: chunks[:-1], "stopped after 12288 of 16384 bytes"),
        (lambda chunks: chunks[:1] + chunks[2:], "jumped to byte 8192 after 4096 bytes"),
        (lambda chunks: [], "ended before tensor"),
        (lambda chunks: chunks + [coordinator_pb2.WeightChunk(name="model.norm.weight", total=256)],
         "'model.norm.weight', which was not requested"),
        (lambda chunks: [coordinator_pb2.WeightChunk(name=c.name, offset=c.offset, data=c.data, total=c.total + 4)
                         for c in chunks], "size mismatch"),
    ],
    ids=["flipped-byte", "truncated", "gap", "empty", "extra", "wrong-total"],
)
def test_bad_streams_raise_and_store_nothing(tamper, match: str, models: dict, tmp_path: Path) -> None:
    model_dir, manifest = models["fp32"]
    name = "model.layers.1.self_attn.q_proj.weight"  # 16 KiB: four 4 KiB chunks
    cache = TensorCache(tmp_path / "cache")
    with serve(Servicer(model_dir, manifest, tamper=tamper)) as stub, pytest.raises(ModelLoadError, match=match):
        fetch_missing(stub, manifest, [name], cache, progress=False)
    stored = [p.name for p in cache.dir.iterdir()]  # no partial file is ever left behind
    sha = next(e.sha256 for e in manifest.tensors if e.name == name)
    # Only a stream that went wrong after the requested tensor arrived intact stores it.
    assert stored == ([sha] if "not requested" in match else [])


def test_fetch_progress_is_log_lines_off_a_terminal(models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENSORFLEET_LOG_FORMAT", raising=False)
    model_dir, manifest = models["fp32"]
    names = _stage_names(manifest, 0, NUM_LAYERS)
    with serve(Servicer(model_dir, manifest)) as stub:
        fetched = fetch_missing(stub, manifest, names, TensorCache(tmp_path / "ok"), progress=True)
        lines = capsys.readouterr().err.splitlines()
        assert 1 <= len(lines) <= 11 and all("[node] fetching " in line and "\r" not in line for line in lines)
        kib = f"{fetched / 1024:.1f} KiB"
        assert f"tensor(s): 100% ({kib} of {kib} in " in lines[-1]
        # A stream that breaks says how far it got, then fails as before.
        name = "model.layers.1.self_attn.q_proj.weight"
        with serve(Servicer(model_dir, manifest, tamper=lambda chunks: chunks[:-1])) as bad, \
                pytest.raises(ModelLoadError, match="truncated"):
            fetch_missing(bad, manifest, [name], TensorCache(tmp_path / "bad"), progress=True)
    assert "WARNING: fetching 1 tensor(s): stopped at 75% (12.0 KiB of 16.0 KiB" in capsys.readouterr().err


def test_server_errors_become_model_load_errors(models: dict, tmp_path: Path) -> None:
    model_dir, manifest = models["fp32"]
    forged = coordinator_pb2.ModelManifest()
    forged.CopyFrom(manifest)
    forged.tensors.add(name="model.layers.9.mlp.up_proj.weight", dtype="F32", shape=[2], nbytes=8,
                       sha256=hashlib.sha256(b"x").hexdigest())
    with serve(Servicer(model_dir, manifest)) as stub, pytest.raises(ModelLoadError, match="NOT_FOUND"):
        fetch_missing(stub, forged, ["model.layers.9.mlp.up_proj.weight"], TensorCache(tmp_path), progress=False)


def test_names_outside_the_manifest_or_cache_are_clear_errors(models: dict, tmp_path: Path) -> None:
    _, manifest = models["fp32"]
    cache = TensorCache(tmp_path)
    with pytest.raises(ModelLoadError, match="model.layers.7.mlp.up_proj.weight"):
        fetch_missing(None, manifest, ["model.layers.7.mlp.up_proj.weight"], cache, progress=False)
    with pytest.raises(ModelLoadError, match="fetch it first"):
        CachedWeightReader(manifest, cache, ["model.norm.weight"])
    reader = CachedWeightReader(manifest, cache)  # default: whatever the cache holds (nothing)
    assert reader.names() == []
    with pytest.raises(ModelLoadError, match="'model.norm.weight' is not among the 0 cached tensors"):
        reader.get("model.norm.weight")


def test_manifest_entries_are_validated(models: dict, tmp_path: Path) -> None:
    _, manifest = models["fp32"]
    for field, value, match in (("nbytes", 3, "states 3 bytes"), ("dtype", "F4", "does not read"),
                                ("sha256", "../../etc/passwd", "not a sha256")):
        forged = coordinator_pb2.ModelManifest()
        forged.CopyFrom(manifest)
        setattr(next(e for e in forged.tensors if e.name == "model.norm.weight"), field, value)
        with pytest.raises(ModelLoadError, match=match):
            fetch_missing(None, forged, ["model.norm.weight"], TensorCache(tmp_path), progress=False)


def test_tensor_cache_stores_atomically_by_content(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path)
    data = b"\x00\x01" * 100
    sha = hashlib.sha256(data).hexdigest()
    assert not cache.has(sha)
    cache.put(sha, data)
    assert cache.has(sha) and cache.has(sha, 200) and not cache.has(sha, 199)
    assert cache.path(sha).read_bytes() == data and cache.verify(sha) and cache.bytes_used() == 200
    other = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        cache.put(other, data)
    assert not cache.has(other) and sorted(p.name for p in cache.dir.iterdir()) == [sha]
    cache.path(sha).write_bytes(b"\x00" * 200)  # corrupted on disk
    assert not cache.verify(sha) and not cache.verify(other)
    with pytest.raises(ModelLoadError, match="not a sha256"):
        cache.path("../escape")


def test_stage_tensor_names_for_llama_stages(models: dict) -> None:
    _, manifest = models["fp32"]
    config = json.loads(manifest.config_json)
    first, middle, last = (_stage_names(manifest, i, i + 1) for i in range(3))
    assert "model.embed_tokens.weight" in first and "model.norm.weight" not in first
    assert {n.split(".")[2] for n in first if ".layers." in n} == {"0"}
    assert all(".layers.1." in n for n in middle) and len(middle) == 9
    assert {"model.norm.weight", "lm_head.weight"} <= set(last) and "model.embed_tokens.weight" not in last
    whole = stage_tensor_names(manifest, config, 0, 3, 3)
    assert sorted(whole) == sorted(e.name for e in manifest.tensors)
    with pytest.raises(ValueError, match=r"\[2, 4\)"):
        stage_tensor_names(manifest, config, 2, 4, 3)
    without_layer_2 = [e.name for e in manifest.tensors if ".layers.2." not in e.name]
    with pytest.raises(ModelLoadError, match=r"layers \[2\]"):
        stage_tensor_names(without_layer_2, config, 1, 3, 3)


def test_stage_tensor_names_with_tied_embeddings(models: dict) -> None:
    _, manifest = models["tied"]
    config = json.loads(manifest.config_json)
    names = [e.name for e in manifest.tensors]
    assert "lm_head.weight" not in names
    last = stage_tensor_names(manifest, config, 2, 3, 3)
    assert {"model.norm.weight", "model.embed_tokens.weight"} <= set(last)
    # Tied: a stored lm_head.weight is not read (the head uses the embedding table), so not fetched.
    last = stage_tensor_names([*names, "lm_head.weight"], config, 2, 3, 3)
    assert "lm_head.weight" not in last and "model.embed_tokens.weight" in last
    # Untied but no lm_head.weight stored: the embedding table stands in, as the engine reads it.
    untied = {**config, "tie_word_embeddings": False}
    assert "model.embed_tokens.weight" in stage_tensor_names(names, untied, 2, 3, 3)


def test_stage_tensor_names_for_opt() -> None:
    config = {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 64, "vocab_size": 50, "word_embed_proj_dim": 16}
    p = "model.decoder"
    layer = [f"{p}.layers.{i}.{part}" for i in range(2) for part in
             ("self_attn.q_proj.weight", "fc1.weight", "final_layer_norm.weight", "self_attn_layer_norm.bias")]
    ends = [f"{p}.embed_tokens.weight", f"{p}.embed_positions.weight", f"{p}.project_in.weight",
            f"{p}.project_out.weight", f"{p}.final_layer_norm.weight", f"{p}.final_layer_norm.bias"]
    names = layer + ends
    first = stage_tensor_names(names, config, 0, 1, 2)
    assert set(first) == {*layer[:4], *ends[:3]}
    last = stage_tensor_names(names, config, 1, 2, 2)  # OPT ties embeddings by default
    assert set(last) == {*layer[4:], f"{p}.embed_tokens.weight", *ends[3:]}
