"""A node's weights when it has no local model directory: fetched from the coordinator, cached by hash.

The coordinator's manifest gives every tensor's sha256; the node stores each tensor's raw bytes under
``<root>/tensors/<sha256>``, so a node that rejoins (or takes over other layers of the same model)
fetches only what it lacks, and identical tensors (say, every layer norm of a fresh model) are stored
once. Every tensor is checked on arrival (contiguous chunks, the size the manifest states, the hash)
before it is stored, and stored atomically, so the cache never holds a partial or wrong tensor.

``CachedWeightReader`` offers the interface the engine reads checkpoints through (``WeightReader``'s),
so a stage loads from the cache exactly as it loads from a model directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import numpy as np
import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.progress import Progress
from engine.progress import progress as progress_bar
from engine.weights import _DTYPES  # safetensors dtype code -> (bytes per element, torch dtype)
from tensorfleet.v1 import coordinator_pb2

_SHA256 = re.compile(r"[0-9a-f]{64}")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_REFETCH = "the coordinator's copy differs from its manifest; refetch or restart the coordinator"


def _check_sha(sha: str) -> str:
    # The hash names a file: anything but 64 hex digits (from a bad manifest) must not become a path.
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ModelLoadError(f"{sha!r} is not a sha256 hex digest (64 lowercase hex digits)")
    return sha


class TensorCache:
    """Content-addressed store of raw tensor bytes: ``<root>/tensors/<sha256>``, written atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.dir = self.root / "tensors"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.dir / _check_sha(sha)

    def has(self, sha: str, nbytes: int | None = None) -> bool:
        """Whether the tensor is stored (and, given ``nbytes``, has that size: a cheap integrity check)."""
        try:
            size = self.path(sha).stat().st_size
        except FileNotFoundError:
            return False
        return nbytes is None or size == nbytes

    def verify(self, sha: str) -> bool:
        """Recompute the stored bytes' sha256; False when it differs or the file is missing."""
        digest = hashlib.sha256()
        try:
            with self.path(sha).open("rb") as f:
                while block := f.read(8 << 20):
                    digest.update(block)
        except FileNotFoundError:
            return False
        return digest.hexdigest() == sha

    def bytes_used(self) -> int:
        """Bytes of the stored tensors (partial files of fetches in progress are not counted)."""
        return sum(p.stat().st_size for p in self.dir.iterdir() if _SHA256.fullmatch(p.name))

    def put(self, sha: str, data: bytes) -> None:
        """Store bytes whose sha256 must be ``sha`` (ModelLoadError otherwise)."""
        with self.writer(sha, what=sha) as w:
            w.write(data)

    def writer(self, sha: str, *, what: str) -> _TensorWriter:
        """A context manager that streams one tensor into the cache: its bytes become visible under
        ``sha`` only if the ``with`` block ends without error and their hash matches."""
        return _TensorWriter(self, _check_sha(sha), what)


class _TensorWriter:
    def __init__(self, cache: TensorCache, sha: str, what: str) -> None:
        self.cache, self.sha, self.what = cache, sha, what
        self.size = 0
        self._digest = hashlib.sha256()
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> _TensorWriter:
        fd, tmp = tempfile.mkstemp(dir=self.cache.dir, prefix=".partial-")
        self._file, self._tmp = os.fdopen(fd, "wb"), Path(tmp)
        return self

    def write(self, data: bytes) -> None:
        assert self._file is not None, "use the writer in a with block"
        self._file.write(data)
        self._digest.update(data)
        self.size += len(data)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        assert self._file is not None and self._tmp is not None
        try:
            self._file.close()
            if exc_type is None:
                if self._digest.hexdigest() != self.sha:
                    raise ModelLoadError(f"checksum mismatch for {self.what}: {_REFETCH}")
                os.replace(self._tmp, self.cache.path(self.sha))
        finally:
            self._tmp.unlink(missing_ok=True)


def _entries(manifest: coordinator_pb2.ModelManifest) -> dict[str, coordinator_pb2.TensorEntry]:
    return {e.name: e for e in manifest.tensors}


def _checked_entry(entry: coordinator_pb2.TensorEntry) -> coordinator_pb2.TensorEntry:
    """Manifest entries arrive over the wire: the dtype must be one we read and the size must match."""
    if entry.dtype not in _DTYPES:
        raise ModelLoadError(f"manifest tensor {entry.name!r} has dtype {entry.dtype!r}, which tensorfleet "
                             f"does not read (supported: {', '.join(_DTYPES)})")
    if any(d < 0 for d in entry.shape):
        raise ModelLoadError(f"manifest tensor {entry.name!r} has a negative size in shape {list(entry.shape)}")
    expected = math.prod(entry.shape) * _DTYPES[entry.dtype][0]
    if entry.nbytes != expected:
        raise ModelLoadError(f"manifest tensor {entry.name!r} states {entry.nbytes} bytes, but {entry.dtype} "
                             f"{list(entry.shape)} needs {expected}: the manifest is corrupt; restart the coordinator")
    _check_sha(entry.sha256)
    return entry


def fetch_missing(stub: Any, manifest: coordinator_pb2.ModelManifest, names: Iterable[str], cache: TensorCache,
                  *, node_id: str = "", progress: bool = True) -> int:
    """Fetch the named tensors that ``cache`` lacks from the coordinator (``stub.FetchWeights``), check
    each, and store it. Returns the bytes fetched: 0 when everything was cached already."""
    entries = _entries(manifest)
    wanted: dict[str, coordinator_pb2.TensorEntry] = {}  # sha -> the one entry fetched for it
    for name in names:
        entry = entries.get(name)
        if entry is None:
            raise ModelLoadError(f"tensor {name!r} is not in the manifest of model {manifest.name!r} "
                                 f"({len(entries)} tensors; does the placement match this model?)")
        _checked_entry(entry)
        if entry.sha256 not in wanted and not cache.has(entry.sha256, entry.nbytes):
            wanted[entry.sha256] = entry
    if not wanted:
        return 0
    order = list(wanted.values())
    total = sum(e.nbytes for e in order)
    request = coordinator_pb2.FetchWeightsRequest(node_id=node_id, names=[e.name for e in order])
    with progress_bar(f"fetching {len(order)} tensor(s)", total, tag="node", enabled=progress) as bar:
        call = stub.FetchWeights(request)
        try:
            _receive(call, order, cache, bar)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            raise ModelLoadError(f"fetching {len(order)} tensors from the coordinator failed "
                                 f"({getattr(code, 'name', code)}: {details})") from e
        finally:
            if hasattr(call, "cancel"):
                call.cancel()  # stops the coordinator's stream after a bad chunk; a no-op once it ended
    return total


def _receive(stream: Iterable[coordinator_pb2.WeightChunk], order: Sequence[coordinator_pb2.TensorEntry],
             cache: TensorCache, bar: Progress) -> None:
    """Consume the chunk stream: tensors in request order, each tensor's chunks contiguous from 0."""
    chunks = iter(stream)
    pending: coordinator_pb2.WeightChunk | None = next(chunks, None)
    for entry in order:
        if pending is None:
            raise ModelLoadError(f"the weight stream ended before tensor {entry.name!r} arrived: "
                                 "the coordinator stopped or the connection broke; refetch")
        if pending.name != entry.name:
            raise ModelLoadError(f"the weight stream sent tensor {pending.name!r} where {entry.name!r} was due: "
                                 f"{_REFETCH}")
        with cache.writer(entry.sha256, what=entry.name) as w:
            pending = _receive_one(pending, chunks, entry, w, bar)
    if pending is not None:
        raise ModelLoadError(f"the weight stream sent tensor {pending.name!r}, which was not requested: {_REFETCH}")


def _receive_one(first: coordinator_pb2.WeightChunk, chunks: Iterator[coordinator_pb2.WeightChunk],
                 entry: coordinator_pb2.TensorEntry, w: _TensorWriter,
                 bar: Progress) -> coordinator_pb2.WeightChunk | None:
    """Write one tensor's chunks; return the first chunk of the next tensor (None at the end)."""
    chunk: coordinator_pb2.WeightChunk | None = first
    count = 0
    while chunk is not None and chunk.name == entry.name:
        if chunk.total != entry.nbytes:
            raise ModelLoadError(f"size mismatch for {entry.name}: the stream says {chunk.total} bytes, the "
                                 f"manifest {entry.nbytes}: {_REFETCH}")
        if chunk.offset != w.size:
            raise ModelLoadError(f"the weight stream for {entry.name} jumped to byte {chunk.offset} after "
                                 f"{w.size} bytes (chunks must be contiguous): {_REFETCH}")
        if w.size + len(chunk.data) > entry.nbytes:
            raise ModelLoadError(f"the weight stream for {entry.name} overran its {entry.nbytes} bytes: {_REFETCH}")
        if not chunk.data and (entry.nbytes > 0 or count > 0):  # only a zero-byte tensor's one chunk is empty
            raise ModelLoadError(f"the weight stream for {entry.name} sent an empty chunk: {_REFETCH}")
        w.write(chunk.data)
        count += 1
        bar.update(len(chunk.data))
        chunk = next(chunks, None)
    if w.size != entry.nbytes:
        raise ModelLoadError(f"the weight stream for {entry.name} stopped after {w.size} of {entry.nbytes} bytes "
                             "(truncated): the coordinator stopped or the connection broke; refetch")
    return chunk


class CachedWeightReader:
    """Reads tensors from a TensorCache through the interface the engine uses on ``WeightReader``.

    ``names`` are the tensors available (default: every manifest tensor the cache holds); reads are
    lazy and a dim-0 slice reads only its rows' bytes.
    """

    def __init__(self, manifest: coordinator_pb2.ModelManifest, cache: TensorCache,
                 names: Iterable[str] | None = None) -> None:
        self.manifest, self.cache = manifest, cache
        entries = _entries(manifest)
        if names is None:
            names = [n for n, e in entries.items() if _SHA256.fullmatch(e.sha256) and cache.has(e.sha256, e.nbytes)]
        self._entries: dict[str, coordinator_pb2.TensorEntry] = {}
        for name in names:
            entry = entries.get(name)
            if entry is None:
                raise ModelLoadError(f"tensor {name!r} is not in the manifest of model {manifest.name!r}")
            _checked_entry(entry)
            if not cache.has(entry.sha256, entry.nbytes):
                raise ModelLoadError(f"tensor {name!r} is not in the weight cache {cache.root} (or has the wrong "
                                     "size there): fetch it first")
            self._entries[name] = entry

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> coordinator_pb2.TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelLoadError(
                f"tensor {name!r} is not among the {len(self._entries)} cached tensors of model "
                f"{self.manifest.name!r} (was it fetched? does the config match this checkpoint?)"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entry(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entry(name).dtype][1]

    def nbytes(self, names: Iterable[str]) -> int:
        """Stored bytes of these tensors (before any cast), for memory planning."""
        return sum(self.entry(n).nbytes for n in names)

    def get(self, name: str, *, dtype: torch.dtype | None = None,
            device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one whole tensor, optionally cast, onto ``device``."""
        entry = self.entry(name)
        raw = self._read(entry, 0, entry.nbytes)
        tensor = _as_tensor(raw, entry.dtype, tuple(entry.shape))
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def get_slice(self, name: str, dim: int, start: int, stop: int, *, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
        """Read only [start, stop) along dim 0 or 1 (a tensor-parallel shard), not the whole tensor."""
        entry = self.entry(name)
        shape = tuple(entry.shape)
        if dim not in (0, 1):
            raise ValueError(f"get_slice dim={dim} for {name!r}: only dims 0 and 1 are supported")
        if dim >= len(shape) or not 0 <= start <= stop <= shape[dim]:
            raise ModelLoadError(f"cannot slice [{start}, {stop}) along dim {dim} of {name!r} with shape "
                                 f"{list(shape)} (does the config match this checkpoint?)")
        row = entry.nbytes // shape[0] if shape[0] else 0  # bytes per index along dim 0
        if dim == 0:  # rows are one contiguous byte range
            raw = self._read(entry, start * row, stop * row)
            tensor = _as_tensor(raw, entry.dtype, (stop - start, *shape[1:]))
        else:  # [rows, cols * inner] bytes; keep the columns' byte range of every row
            col = row // shape[1] if shape[1] else 0
            mapped = np.memmap(self.cache.path(entry.sha256), dtype=np.uint8, mode="r",
                               shape=(shape[0], row)) if entry.nbytes else np.empty((shape[0], 0), np.uint8)
            raw = mapped[:, start * col: stop * col].copy().reshape(-1)  # a copy: nothing keeps the map open
            del mapped
            tensor = _as_tensor(raw, entry.dtype, (shape[0], stop - start, *shape[2:]))
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def close(self) -> None:
        """Nothing stays open between reads; here for parity with ``WeightReader``."""

    def __enter__(self) -> CachedWeightReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, entry: coordinator_pb2.TensorEntry, begin: int, end: int) -> np.ndarray:
        path = self.cache.path(entry.sha256)
        try:
            raw = np.fromfile(path, dtype=np.uint8, count=end - begin, offset=begin)
        except OSError as e:
            raise ModelLoadError(f"cannot read tensor {entry.name!r} from the weight cache ({path}): {e}") from e
        if raw.size != end - begin:
            raise ModelLoadError(f"the cached copy of {entry.name!r} ({path}) is truncated: delete it and refetch")
        return raw


def _as_tensor(raw: np.ndarray, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw little-endian bytes (a fresh uint8 array) as a tensor of safetensors dtype ``code``."""
    dtype = _DTYPES[code][1]
    if raw.size == 0:  # torch cannot reinterpret an empty array's (zero) stride
        return torch.empty(shape, dtype=dtype)
    # uint8 -> target dtype by reinterpreting bytes: covers BF16 and FP8, which numpy has no type for.
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def stage_tensor_names(manifest_or_names: coordinator_pb2.ModelManifest | Iterable[str], hf_config: dict[str, Any],
                       start: int, end: int, num_layers: int) -> list[str]:
    """The tensors a stage holding layers [start, end) reads, among the names given (or the manifest's):
    its layers; the embedding on the first stage; the final norm and head on the last, where a tied (or
    absent) ``lm_head.weight`` means the embedding table."""
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"layer range [{start}, {end}) is not within the model's {num_layers} layers")
    if isinstance(manifest_or_names, coordinator_pb2.ModelManifest):
        available = [e.name for e in manifest_or_names.tensors]
    else:
        available = list(manifest_or_names)
    present = set(available)
    wanted: set[str] = set()
    layers: set[int] = set()
    for name in available:
        layer = _layer_of(name)
        if layer is not None and start <= layer < end:
            wanted.add(name)
            layers.add(layer)
    missing = sorted(set(range(start, end)) - layers)
    if missing:
        raise ModelLoadError(f"the weights hold no tensors for layers {missing} (names like 'model.layers.N.*'): "
                             "does the config match this checkpoint?")
    if start == 0:
        wanted |= present & set(_EMBEDDING)
    if end == num_layers:
        tied = ModelConfig.from_hf(hf_config).tie_word_embeddings
        wanted |= {n for n in present if n.startswith(_FINAL_PREFIXES)}
        if not tied and "lm_head.weight" in present:
            wanted.add("lm_head.weight")
        else:  # the head reads the embedding table
            wanted |= present & set(_TABLES)
    return [n for n in available if n in wanted]


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


_EMBEDDING = ("model.embed_tokens.weight", "model.decoder.embed_tokens.weight",
              "model.decoder.embed_positions.weight", "model.decoder.project_in.weight")
_TABLES = ("model.embed_tokens.weight", "model.decoder.embed_tokens.weight")
_FINAL_PREFIXES = ("model.norm.", "model.decoder.final_layer_norm.", "model.decoder.project_out.")


def manifest_config(manifest: coordinator_pb2.ModelManifest) -> dict[str, Any]:
    """The manifest's config.json as a dict (ModelLoadError when it is not a JSON object)."""
    try:
        config = json.loads(manifest.config_json)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"the manifest's config.json is not valid JSON ({e.msg}): restart the coordinator") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"the manifest's config.json is a JSON {type(config).__name__}, expected an object")
    return config
