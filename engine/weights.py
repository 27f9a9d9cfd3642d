"""Lazy reads of a Hugging Face model directory's safetensors weights.

A pipeline stage holds only its own layers, so it must be able to read single tensors (or row/column
shards of them for tensor parallelism) without touching the rest of the checkpoint: memory grows with
the stage's layers, not with the model. Every file's header is validated up front, before any tensor
data is read, so a truncated download or a corrupted file fails at startup with a message that says
which file and what to do, instead of deep inside a forward pass. ``write_safetensors`` writes one
file with a progress callback (for GGUF conversion, engine/model_source.py).
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# The safetensors format itself refuses headers above 100 MB; a larger length means garbage bytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype code -> (bytes per element, torch dtype). Sub-byte codes (F4, F6_*) are left out:
# no model family we serve stores them, and their byte counts are not prod(shape) * itemsize.
_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E5M2": (1, torch.float8_e5m2),
    "F8_E8M0": (1, torch.float8_e8m0fnu),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U64": (8, torch.uint64),
    "U32": (4, torch.uint32),
    "U16": (2, torch.uint16),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
}

_CODES = {dtype: code for code, (_, dtype) in _DTYPES.items()}
_WRITE_CHUNK = 64 << 20  # bytes per write: the progress callback's granularity

_REDOWNLOAD = "(re-download or re-convert the model)"


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    """Where one tensor lives and what it is, from a safetensors header (no data read)."""

    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the first byte after the header
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype][1]


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; raise ModelLoadError naming what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _invalid(path, f"missing: the file is only {size} bytes")
            header_len = int.from_bytes(prefix, "little")
            if not 0 < header_len <= MAX_HEADER_BYTES:
                raise _invalid(path, f"length field is {header_len}, expected 1..{MAX_HEADER_BYTES}")
            if 8 + header_len > size:
                raise ModelLoadError(
                    f"{path} is truncated: {size} bytes, the header alone needs {8 + header_len} "
                    f"{_REDOWNLOAD}"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _invalid(path, f"is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise _invalid(path, f"is a JSON {type(header).__name__}, expected an object")
    header.pop("__metadata__", None)
    infos = {name: _parse_entry(path, name, entry) for name, entry in header.items()}
    _check_layout(path, infos, data_start=8 + header_len, size=size)
    return infos


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, calling ``on_bytes(n)`` after each write of n data
    bytes. safetensors' own save_file writes the whole file in one call, with no progress to show."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _CODES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _CODES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so that the data starts 8-byte aligned
    with Path(path).open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for tensor in tensors.values():
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # little-endian hosts
            for start in range(0, data.size, _WRITE_CHUNK):
                f.write(data[start:start + _WRITE_CHUNK])
                if on_bytes is not None:
                    on_bytes(min(_WRITE_CHUNK, data.size - start))


def _invalid(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path} is not a valid safetensors file (header {what}) {_REDOWNLOAD}")


def _parse_entry(path: Path, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _invalid(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has dtype {dtype!r}, which tensorfleet does not read "
            f"(supported: {', '.join(_DTYPES)})"
        )
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise _invalid(path, f"entry {name!r} has shape {shape!r}, expected a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _invalid(path, f"entry {name!r} has data_offsets {offsets!r}, expected [begin, end]")
    info = TensorInfo(file=path, dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])
    expected = math.prod(info.shape) * _DTYPES[dtype][0]
    if info.nbytes != expected:
        raise _invalid(
            path,
            f"entry {name!r} spans {info.nbytes} bytes, but {dtype} {list(shape)} needs {expected}",
        )
    return info


def _check_layout(path: Path, infos: dict[str, TensorInfo], *, data_start: int, size: int) -> None:
    # Overlapping ranges would make two tensors alias the same bytes: a corrupted or forged file.
    spans = sorted((i.begin, i.end, n) for n, i in infos.items() if i.nbytes > 0)
    for (_, prev_end, prev), (begin, _, name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise _invalid(path, f"entries {prev!r} and {name!r} overlap")
    needed = data_start + max((i.end for i in infos.values()), default=0)
    if size < needed:
        raise ModelLoadError(
            f"{path} is truncated: {size} bytes, the header says {needed} are needed {_REDOWNLOAD}"
        )


class WeightReader:
    """Reads tensors of one model directory on demand; validates every file's header when built."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._infos: dict[str, TensorInfo] = _discover(self.model_dir)
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()  # stages may load layers from several threads

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelLoadError(
                f"tensor {name!r} is not in the weights of {self.model_dir} "
                f"({len(self._infos)} tensors; does the config match this checkpoint?)"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).torch_dtype

    def nbytes(self, names: Iterable[str]) -> int:
        """Stored bytes of these tensors (before any cast), for memory planning."""
        return sum(self.info(n).nbytes for n in names)

    def get(
        self, name: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Read one whole tensor, optionally cast, onto `device`."""
        info = self.info(name)
        tensor = self._read(info, name, lambda h: h.get_tensor(name))
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def get_slice(
        self,
        name: str,
        dim: int,
        start: int,
        stop: int,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Read only [start, stop) along dim 0 or 1 (a tensor-parallel shard), not the whole tensor."""
        info = self.info(name)
        if dim not in (0, 1):
            raise ValueError(f"get_slice dim={dim} for {name!r}: only dims 0 and 1 are supported")
        if dim >= len(info.shape) or not 0 <= start <= stop <= info.shape[dim]:
            raise ModelLoadError(
                f"cannot slice [{start}, {stop}) along dim {dim} of {name!r} with shape "
                f"{list(info.shape)} in {info.file} (does the config match this checkpoint?)"
            )
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        tensor = self._read(info, name, lambda h: h.get_slice(name)[index])
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def close(self) -> None:
        with self._lock:
            self._handles.clear()

    def __enter__(self) -> WeightReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, info: TensorInfo, name: str, fn: Any) -> torch.Tensor:
        try:
            return fn(self._handle(info.file))
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises its own error types; name the file and tensor
            raise ModelLoadError(
                f"cannot read tensor {name!r} from {info.file}: {type(e).__name__}: {e} {_REDOWNLOAD}"
            ) from e

    def _handle(self, file: Path) -> Any:
        with self._lock:
            handle = self._handles.get(file)
            if handle is None:
                handle = safe_open(str(file), framework="pt")  # maps the file, reads no tensor data
                self._handles[file] = handle
            return handle


def _discover(model_dir: Path) -> dict[str, TensorInfo]:
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist or is not a directory")
    if (model_dir / INDEX_FILE).is_file():
        return _read_indexed(model_dir)
    if (model_dir / SINGLE_FILE).is_file():
        return read_safetensors_header(model_dir / SINGLE_FILE)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_dir} has no safetensors weights ({INDEX_FILE}, {SINGLE_FILE} or *.safetensors)"
        )
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in infos:
                raise ModelLoadError(
                    f"tensor {name!r} is stored in both {infos[name].file.name} and {file.name} "
                    f"in {model_dir}: remove the stray file or add a {INDEX_FILE}"
                )
            infos[name] = info
    return infos


def _read_indexed(model_dir: Path) -> dict[str, TensorInfo]:
    weight_map = _load_weight_map(model_dir / INDEX_FILE)
    headers: dict[str, dict[str, TensorInfo]] = {}
    for file_name in sorted(set(weight_map.values())):
        file = model_dir / file_name
        if not file.is_file():
            raise ModelLoadError(
                f"{model_dir / INDEX_FILE} names shard {file_name}, which is missing {_REDOWNLOAD}"
            )
        headers[file_name] = read_safetensors_header(file)
    infos: dict[str, TensorInfo] = {}
    for name, file_name in weight_map.items():
        info = headers[file_name].get(name)
        if info is None:
            raise ModelLoadError(
                f"{model_dir / INDEX_FILE} places tensor {name!r} in {file_name}, which does not "
                f"hold it {_REDOWNLOAD}"
            )
        infos[name] = info
    return infos


def _load_weight_map(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelLoadError(f"cannot read {index_path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index_path} is not valid JSON ({e}) {_REDOWNLOAD}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelLoadError(
            f"{index_path} has no valid 'weight_map' (an object of tensor name -> file) {_REDOWNLOAD}"
        )
    # A shard name with a path separator could point outside the model directory.
    for file_name in weight_map.values():
        if Path(file_name).name != file_name:
            raise ModelLoadError(f"{index_path} names shard {file_name!r}, which is not a plain file name")
    return weight_map
