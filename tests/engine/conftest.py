"""Shared fixtures for engine tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.model_source import resolve_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_model_cache() -> Path:
    """Where converted test models live: kept across runs (gitignored) so only the first run converts."""
    env = os.environ.get("TENSORFLEET_TEST_CACHE")
    return Path(env).expanduser() if env else REPO_ROOT / ".cache" / "test-models"


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory (fp32 safetensors)."""
    return resolve_model(None, cache_dir=shared_model_cache(), progress=False).path
