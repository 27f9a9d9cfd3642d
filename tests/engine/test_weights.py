"""WeightReader: lazy safetensors reads, tensor-parallel slices, and up-front validation of files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import engine.weights
from engine.errors import ModelLoadError
from engine.weights import INDEX_FILE, WeightReader, read_safetensors_header, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.proj.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "layers.0.proj.bias": torch.randn(12, generator=g).to(torch.float16),
        "layers.1.proj.weight": torch.randn(12, 8, generator=g),
        "positions": torch.arange(10, dtype=torch.int64),
    }


@pytest.fixture
def single_dir(tmp_path: Path) -> Path:
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.fixture
def sharded_dir(tmp_path: Path) -> Path:
    tensors = _tensors()
    shards = {
        "model-00001-of-00002.safetensors": ["embed.weight", "layers.0.proj.weight", "layers.0.proj.bias"],
        "model-00002-of-00002.safetensors": ["layers.1.proj.weight", "positions"],
    }
    weight_map = {}
    for file, names in shards.items():
        save_file({n: tensors[n] for n in names}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(names, file))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


@pytest.mark.parametrize("layout", ["single_dir", "sharded_dir"])
def test_reads_every_tensor_with_its_shape_and_dtype(layout: str, request: pytest.FixtureRequest) -> None:
    reader = WeightReader(request.getfixturevalue(layout))
    expected = _tensors()
    assert sorted(reader.names()) == sorted(expected)
    for name, tensor in expected.items():
        assert name in reader
        assert reader.shape(name) == tuple(tensor.shape)
        assert reader.dtype(name) == tensor.dtype
        assert torch.equal(reader.get(name), tensor)
    assert "missing.weight" not in reader


def test_get_casts_when_asked(single_dir: Path) -> None:
    reader = WeightReader(single_dir)
    got = reader.get("layers.0.proj.weight", dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, _tensors()["layers.0.proj.weight"].float())


def test_nbytes_counts_stored_bytes(sharded_dir: Path) -> None:
    reader = WeightReader(sharded_dir)
    assert reader.nbytes(["embed.weight"]) == 16 * 8 * 4
    assert reader.nbytes(["layers.0.proj.weight", "layers.0.proj.bias"]) == 12 * 8 * 2 + 12 * 2
    assert reader.nbytes([]) == 0
    assert reader.nbytes(reader.names()) == sum(t.numel() * t.element_size() for t in _tensors().values())


@pytest.mark.parametrize("layout", ["single_dir", "sharded_dir"])
def test_get_slice_matches_slicing_the_full_tensor(layout: str, request: pytest.FixtureRequest) -> None:
    reader = WeightReader(request.getfixturevalue(layout))
    for name in ("embed.weight", "layers.0.proj.weight", "layers.1.proj.weight"):
        full = reader.get(name)
        assert torch.equal(reader.get_slice(name, 0, 3, 9), full[3:9])
        assert torch.equal(reader.get_slice(name, 1, 2, 6), full[:, 2:6])
        assert reader.get_slice(name, 0, 4, 4).shape == (0, full.shape[1])
    bias = reader.get_slice("layers.0.proj.bias", 0, 6, 12, dtype=torch.float32)
    assert bias.dtype == torch.float32
    assert torch.equal(bias, _tensors()["layers.0.proj.bias"][6:].float())


def test_get_slice_rejects_a_range_outside_the_tensor(single_dir: Path) -> None:
    reader = WeightReader(single_dir)
    with pytest.raises(ModelLoadError, match=r"cannot slice \[0, 17\) along dim 0 of 'embed.weight'"):
        reader.get_slice("embed.weight", 0, 0, 17)
    with pytest.raises(ModelLoadError, match="along dim 1"):
        reader.get_slice("positions", 1, 0, 1)
    with pytest.raises(ValueError, match="dim=2"):
        reader.get_slice("embed.weight", 2, 0, 1)


def test_unknown_tensor_names_the_tensor_and_directory(single_dir: Path) -> None:
    reader = WeightReader(single_dir)
    for call in (reader.get, reader.shape, reader.dtype, lambda n: reader.get_slice(n, 0, 0, 1)):
        with pytest.raises(ModelLoadError, match=rf"'nope.weight' is not in the weights of {single_dir}"):
            call("nope.weight")


def test_truncated_file_is_reported_with_sizes(single_dir: Path) -> None:
    file = single_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match="is truncated") as err:
        WeightReader(single_dir)
    assert f"{len(data) - 100} bytes, the header says {len(data)} are needed" in str(err.value)
    assert "model.safetensors" in str(err.value)


def test_file_cut_inside_its_header_is_truncated(single_dir: Path) -> None:
    file = single_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:40])
    with pytest.raises(ModelLoadError, match="is truncated"):
        WeightReader(single_dir)


@pytest.mark.parametrize(
    "payload",
    [b"\x00" * 3, b"garbage!" * 64, (20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64],
    ids=["too-short", "garbage", "bad-json"],
)
def test_corrupt_header_is_not_a_valid_safetensors_file(tmp_path: Path, payload: bytes) -> None:
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(ModelLoadError, match="is not a valid safetensors file"):
        WeightReader(tmp_path)


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_byte_count_must_match_shape_and_dtype(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    _write_raw(tmp_path / "model.safetensors", header, b"\0" * 24)
    with pytest.raises(ModelLoadError, match=r"spans 20 bytes, but F32 \[2, 3\] needs 24"):
        read_safetensors_header(tmp_path / "model.safetensors")


def test_overlapping_tensors_are_refused(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _write_raw(tmp_path / "model.safetensors", header, b"\0" * 12)
    with pytest.raises(ModelLoadError, match="overlap"):
        WeightReader(tmp_path)


def test_unsupported_dtype_is_named(tmp_path: Path) -> None:
    header = {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}
    _write_raw(tmp_path / "x.safetensors", header, b"\0")
    with pytest.raises(ModelLoadError, match="dtype 'Q4'"):
        WeightReader(tmp_path)


def test_index_naming_a_missing_shard(sharded_dir: Path) -> None:
    (sharded_dir / "model-00002-of-00002.safetensors").unlink()
    expected = "names shard model-00002-of-00002.safetensors, which is missing"
    with pytest.raises(ModelLoadError, match=expected):
        WeightReader(sharded_dir)


def test_index_placing_a_tensor_in_the_wrong_shard(sharded_dir: Path) -> None:
    index = json.loads((sharded_dir / INDEX_FILE).read_text())
    index["weight_map"]["positions"] = "model-00001-of-00002.safetensors"
    (sharded_dir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="places tensor 'positions' in model-00001-of-00002"):
        WeightReader(sharded_dir)


def test_index_that_is_not_json(sharded_dir: Path) -> None:
    (sharded_dir / INDEX_FILE).write_text("{ weight_map: ")
    with pytest.raises(ModelLoadError, match="is not valid JSON"):
        WeightReader(sharded_dir)


def test_index_shard_outside_the_directory(sharded_dir: Path) -> None:
    (sharded_dir / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "../model.safetensors"}}))
    with pytest.raises(ModelLoadError, match="not a plain file name"):
        WeightReader(sharded_dir)


def test_unindexed_files_are_all_read(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "two.safetensors"))
    reader = WeightReader(tmp_path)
    assert sorted(reader.names()) == ["a", "b"]
    assert torch.equal(reader.get("b"), torch.zeros(3))


def test_duplicate_names_across_unindexed_files(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ModelLoadError, match="stored in both one.safetensors and two.safetensors"):
        WeightReader(tmp_path)


def test_directory_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no safetensors weights"):
        WeightReader(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        WeightReader(tmp_path / "absent")


def test_tensor_data_is_read_on_demand(single_dir: Path) -> None:
    """Building a reader reads headers only: bytes changed afterwards are what get() returns."""
    file = single_dir / "model.safetensors"
    reader = WeightReader(single_dir)
    header_len = int.from_bytes(file.read_bytes()[:8], "little")
    info = reader.info("positions")
    assert info.begin >= 0 and info.end - info.begin == 80
    with file.open("r+b") as f:  # rewrite one tensor's bytes in place; the reader must see them
        f.seek(8 + header_len + info.begin)
        f.write(torch.arange(100, 110, dtype=torch.int64).numpy().tobytes())
    assert torch.equal(reader.get("positions"), torch.arange(100, 110))


def test_write_safetensors_reads_back_like_save_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open

    monkeypatch.setattr(engine.weights, "_WRITE_CHUNK", 64)  # several writes per tensor, as for a large one
    tensors = {**_tensors(), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
               "transposed": torch.randn(6, 4).t()}  # not contiguous: written in its logical order
    written: list[int] = []
    write_safetensors(tmp_path / "model.safetensors", tensors, metadata={"format": "pt"}, on_bytes=written.append)
    assert sum(written) == sum(t.numel() * t.element_size() for t in tensors.values())
    assert max(written) == 64 and len(written) > len(tensors)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    reader = WeightReader(tmp_path)  # and the engine's own reader validates the layout
    assert torch.equal(reader.get("layers.0.proj.weight"), tensors["layers.0.proj.weight"])


def test_write_safetensors_refuses_a_dtype_it_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="complex64"):
        write_safetensors(tmp_path / "x.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
