"""The coordinator's KV room per sequence against the model's positions."""

from __future__ import annotations

import pytest

from coordinator.defaults import MAX_SEQ_LEN as DEFAULT_MAX_SEQ_LEN
from coordinator.server import resolve_max_seq_len
from engine.errors import TensorfleetError


def test_the_default_is_capped_by_the_models_positions() -> None:
    assert resolve_max_seq_len(None, {"max_position_embeddings": 512}) == 512
    assert resolve_max_seq_len(None, {"max_position_embeddings": 131072}) == DEFAULT_MAX_SEQ_LEN
    assert resolve_max_seq_len(None, {}) == DEFAULT_MAX_SEQ_LEN  # a config that does not say


def test_an_explicit_length_within_the_positions_is_kept() -> None:
    assert resolve_max_seq_len(300, {"max_position_embeddings": 512}) == 300
    assert resolve_max_seq_len(512, {"max_position_embeddings": 512}) == 512


def test_more_than_the_models_positions_is_refused() -> None:
    # It used to start, then failed every request mid-generation at position 513.
    with pytest.raises(TensorfleetError, match="max_position_embeddings=512"):
        resolve_max_seq_len(1024, {"max_position_embeddings": 512})
