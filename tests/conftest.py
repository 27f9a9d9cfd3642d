"""Shared test configuration: nothing heavy is imported at collection time.

- ``free_port``: a TCP port on 127.0.0.1 that was free a moment ago.
- Tests marked ``gpu`` are skipped when torch.cuda is not available; torch is imported only when such
  tests were collected.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN202
    """Coordinators and clients started by the tests keep their secrets in a temporary state directory,
    never in the user's ~/.tensorfleet (node/security.py); no key from the environment leaks in.
    The default model cache (engine/model_source.py: scripts and processes that convert the embedded model
    without a cache_dir) is the test cache of ``embedded_model_dir``, not ~/.cache/tensorfleet: one
    conversion of the embedded GGUF per clone, not one per cache."""
    names = ("TENSORFLEET_HOME", "TENSORFLEET_API_KEY", "TENSORFLEET_JOIN_TOKEN", "TENSORFLEET_CACHE")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["TENSORFLEET_HOME"] = str(tmp_path_factory.mktemp("tensorfleet-home"))
    os.environ["TENSORFLEET_CACHE"] = str(shared_model_cache())
    os.environ.pop("TENSORFLEET_API_KEY", None)
    os.environ.pop("TENSORFLEET_JOIN_TOKEN", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS just reported free (bind it soon: others may take it)."""
    return _pick_free_port()


def _cuda_skip_reason() -> str | None:
    try:
        import torch
    except ImportError as e:
        return f"needs CUDA: torch is not importable ({e})"
    if not torch.cuda.is_available():
        return "needs CUDA: torch.cuda.is_available() is False"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(skip)


REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_model_cache() -> Path:
    """Where converted test models live: kept across runs (gitignored) so only the first run converts."""
    env = os.environ.get("TENSORFLEET_TEST_CACHE")
    return Path(env).expanduser() if env else REPO_ROOT / ".cache" / "test-models"


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory (fp32 safetensors)."""
    from engine.model_source import resolve_model

    return resolve_model(None, cache_dir=shared_model_cache(), progress=False).path
