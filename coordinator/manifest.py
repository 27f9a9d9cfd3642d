"""The model's manifest and the weight stream that nodes without a local copy fetch their tensors from.

The manifest lists every tensor's name, safetensors dtype, shape, size and the sha256 of its raw bytes;
a node caches tensors by that hash, so a node that rejoins downloads nothing it already holds. Hashing
a large checkpoint takes minutes, so the hashes are kept in a sidecar JSON per safetensors file, in a
cache directory (the model directory may be read-only) and trusted only while the file's path, size
and mtime are unchanged.

Bytes are served straight from the safetensors files by offset: no torch, no whole-file reads. Torch
is not needed to import this module (engine.weights, which reads the headers, is imported on use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from engine.errors import ModelLoadError
from engine.progress import Progress
from engine.progress import progress as progress_bar
from tensorfleet.v1 import coordinator_pb2

log = logging.getLogger(__name__)

# gRPC refuses received messages over 4 MiB by default; a chunk plus its framing must stay below.
MAX_CHUNK_BYTES = (4 << 20) - (64 << 10)
_READ_BLOCK = 8 << 20  # hashing reads this much at a time
_SIDECAR_VERSION = 1


def default_cache_dir() -> Path:
    """``$TENSORFLEET_CACHE``, else ``~/.cache/tensorfleet`` (read when called, not at import)."""
    env = os.environ.get("TENSORFLEET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tensorfleet"


def fingerprint(hashes: dict[str, str]) -> str:
    """sha256 over the sorted ``name:sha256`` lines (each ending in a newline): the weights as a whole."""
    digest = hashlib.sha256()
    for name, sha in sorted(hashes.items()):
        digest.update(f"{name}:{sha}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Span:
    """Where one tensor's bytes lie: absolute offsets in its safetensors file."""

    file: Path
    start: int
    stop: int


def _data_start(path: Path) -> int:
    """Offset of the first data byte: the 8-byte little-endian header length, then the header."""
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _spans(model_dir: Path) -> tuple[dict[str, Any], dict[str, _Span]]:
    """Every tensor's header info (engine.weights validates the headers) and absolute byte span."""
    from engine.weights import WeightReader  # imports torch: only when a checkpoint is read

    reader = WeightReader(model_dir)  # validates every header; reads no tensor data
    infos = {name: reader.info(name) for name in reader.names()}
    starts = {file: _data_start(file) for file in {info.file for info in infos.values()}}
    spans = {
        name: _Span(info.file, starts[info.file] + info.begin, starts[info.file] + info.end)
        for name, info in infos.items()
    }
    return infos, spans


def _hash_range(f: BinaryIO, start: int, stop: int, bar: Progress) -> str:
    """sha256 of bytes [start, stop) of an open file, read in blocks (tests count calls to this)."""
    digest = hashlib.sha256()
    f.seek(start)
    left = stop - start
    while left > 0:
        block = f.read(min(left, _READ_BLOCK))
        if not block:
            raise ModelLoadError(f"{f.name} ended {left} bytes early while hashing: was it truncated?")
        digest.update(block)
        left -= len(block)
        bar.update(len(block))
    return digest.hexdigest()


class _Sidecar:
    """Cached hashes of one safetensors file, valid while its (path, size, mtime_ns) is unchanged."""

    def __init__(self, cache_dir: Path, file: Path) -> None:
        self.file = file.resolve()
        stat = self.file.stat()
        self.key = {"path": str(self.file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        name = hashlib.sha256(str(self.file).encode()).hexdigest()[:32]
        self.path = cache_dir / "manifest-hashes" / f"{name}.json"

    def load(self) -> dict[str, dict[str, Any]]:
        """{tensor: {"start", "stop", "sha256"}}, or {} when absent, stale or unreadable."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable hash cache %s (%s); rehashing %s", self.path, e, self.file)
            return {}
        if not isinstance(data, dict) or data.get("version") != _SIDECAR_VERSION or data.get("key") != self.key:
            return {}
        tensors = data.get("tensors")
        return tensors if isinstance(tensors, dict) else {}

    def save(self, tensors: dict[str, dict[str, Any]]) -> None:
        payload = json.dumps({"version": _SIDECAR_VERSION, "key": self.key, "tensors": tensors}, indent=0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path, payload.encode())
        except OSError as e:  # a cache that cannot be written costs a rehash next start, nothing else
            log.warning("cannot write hash cache %s (%s): the next start will rehash %s", self.path, e, self.file)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _hash_tensors(spans: dict[str, _Span], cache_dir: Path, progress: bool) -> dict[str, str]:
    """sha256 of every tensor's raw bytes, reusing the sidecars where their file is unchanged."""
    by_file: dict[Path, list[str]] = {}
    for name, span in spans.items():
        by_file.setdefault(span.file, []).append(name)
    hashes: dict[str, str] = {}
    todo: list[tuple[Path, _Sidecar, list[str]]] = []
    for file, names in sorted(by_file.items()):
        sidecar = _Sidecar(cache_dir, file)
        cached = sidecar.load()
        missing = []
        for name in names:
            entry, span = cached.get(name), spans[name]
            if isinstance(entry, dict) and [entry.get("start"), entry.get("stop")] == [span.start, span.stop] \
                    and _is_sha256(entry.get("sha256")):
                hashes[name] = entry["sha256"]
            else:
                missing.append(name)
        if missing:
            todo.append((file, sidecar, missing))
    total = sum(spans[n].stop - spans[n].start for _, _, names in todo for n in names)
    with progress_bar("hashing weights", total, tag="coordinator", enabled=progress) as bar:
        for file, sidecar, missing in todo:
            with file.open("rb") as f:
                for name in sorted(missing, key=lambda n: spans[n].start):  # one sequential pass
                    hashes[name] = _hash_range(f, spans[name].start, spans[name].stop, bar)
            sidecar.save({n: {"start": spans[n].start, "stop": spans[n].stop, "sha256": hashes[n]}
                          for n in by_file[file]})
    return hashes


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def build_manifest(model_dir: str | Path, *, name: str, progress: bool = True,
                   cache_dir: str | Path | None = None) -> coordinator_pb2.ModelManifest:
    """The manifest of a Hugging Face model directory: config.json verbatim, every tensor's header
    info and sha256, and the fingerprint of the whole.

    Hashes are cached in ``cache_dir`` (default: ``default_cache_dir()``), so a restart on unchanged
    files reads only the headers.
    """
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    try:
        config_json = config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{model_dir} has no config.json: not a Hugging Face model directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {config_file}: {e}") from e
    infos, spans = _spans(model_dir)
    hashes = _hash_tensors(spans, Path(cache_dir) if cache_dir is not None else default_cache_dir(), progress)
    entries = [
        coordinator_pb2.TensorEntry(name=n, dtype=infos[n].dtype, shape=list(infos[n].shape),
                                    nbytes=infos[n].nbytes, sha256=hashes[n])
        for n in sorted(infos)
    ]
    return coordinator_pb2.ModelManifest(name=name, config_json=config_json, tensors=entries,
                                         fingerprint=fingerprint(hashes))


class WeightServer:
    """Streams the raw bytes of named tensors from a model directory, as the manifest describes them.

    ``chunks`` validates the whole request before the first byte: every name must be in the manifest,
    once; a request may name at most ``max_names`` tensors (default: all of them) and ``max_bytes``
    bytes (default: the whole model), so no request makes the coordinator read more than the model.
    """

    def __init__(self, model_dir: str | Path, manifest: coordinator_pb2.ModelManifest, *,
                 max_names: int | None = None, max_bytes: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        infos, spans = _spans(self.model_dir)
        self._entries = {e.name: e for e in manifest.tensors}
        for entry in manifest.tensors:
            info = infos.get(entry.name)
            if info is None:
                raise ModelLoadError(f"manifest tensor {entry.name!r} is not in the weights of {self.model_dir}: "
                                     "the manifest was built from another checkpoint; rebuild it")
            if (info.dtype, list(info.shape), info.nbytes) != (entry.dtype, list(entry.shape), entry.nbytes):
                raise ModelLoadError(
                    f"manifest tensor {entry.name!r} is {entry.dtype} {list(entry.shape)} ({entry.nbytes} bytes), "
                    f"but {info.file} holds {info.dtype} {list(info.shape)} ({info.nbytes} bytes): rebuild the "
                    "manifest")
        self._spans = {n: spans[n] for n in self._entries}
        self.total_bytes = sum(e.nbytes for e in manifest.tensors)
        self.max_names = len(self._entries) if max_names is None else max_names
        self.max_bytes = self.total_bytes if max_bytes is None else max_bytes

    def chunks(self, names: Sequence[str], chunk_bytes: int = 1 << 20) -> Iterator[coordinator_pb2.WeightChunk]:
        """The chunks of ``names``, in request order, each tensor's in offset order (a zero-byte tensor
        is one empty chunk). Raises ValueError, before streaming, naming what is wrong with the request.
        """
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be in 1..{MAX_CHUNK_BYTES}")
        names = list(names)
        if len(names) > self.max_names:
            raise ValueError(f"the request names {len(names)} tensors; at most {self.max_names} per request")
        seen: set[str] = set()
        for name in names:
            if name not in self._entries:
                raise ValueError(f"tensor {name!r} is not in the manifest of model {self.manifest.name!r} "
                                 f"({len(self._entries)} tensors)")
            if name in seen:
                raise ValueError(f"tensor {name!r} is named twice in one request")
            seen.add(name)
        total = sum(self._entries[n].nbytes for n in names)
        if total > self.max_bytes:
            raise ValueError(f"the request asks for {total} bytes; at most {self.max_bytes} per request")
        return self._stream(names, chunk_bytes)

    def _stream(self, names: list[str], chunk_bytes: int) -> Iterator[coordinator_pb2.WeightChunk]:
        files: dict[Path, BinaryIO] = {}
        try:
            for name in names:
                span = self._spans[name]
                f = files.get(span.file)
                if f is None:
                    f = files[span.file] = span.file.open("rb")
                yield from _tensor_chunks(f, name, span, chunk_bytes)
        finally:
            for f in files.values():
                f.close()


def _tensor_chunks(f: BinaryIO, name: str, span: _Span, chunk_bytes: int) -> Iterator[coordinator_pb2.WeightChunk]:
    total = span.stop - span.start
    if total == 0:
        yield coordinator_pb2.WeightChunk(name=name, offset=0, data=b"", total=0)
        return
    offset = 0
    while offset < total:
        f.seek(span.start + offset)
        data = f.read(min(chunk_bytes, total - offset))
        if not data:
            raise ModelLoadError(f"{span.file} ended while serving tensor {name!r} at byte {offset} of {total}: "
                                 "was the checkpoint changed after the coordinator started? restart it")
        yield coordinator_pb2.WeightChunk(name=name, offset=offset, data=data, total=total)
        offset += len(data)
