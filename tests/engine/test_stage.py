"""Layer-range stages load only their own tensors; KV cache sizing; step metadata; reduced dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.attention import StepMeta
from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.kv_cache import KVCacheSpec, slots_for_memory
from engine.llm import LLM, EngineConfig, even_split
from engine.model_source import load_hf_config
from engine.stage import StageModel, parse_dtype
from engine.weights import WeightReader
from tests.engine.reference import load_reference, make_random_model, reference_logits
from tests.engine.test_fidelity import random_prompts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_model("llama3-rope", tmp_path_factory.mktemp("stage") / "m")


class RecordingReader(WeightReader):
    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.read: set[str] = set()

    def get(self, name, **kw):  # noqa: ANN001, ANN003, ANN201
        self.read.add(name)
        return super().get(name, **kw)

    def get_slice(self, name, dim, start, stop, **kw):  # noqa: ANN001, ANN003, ANN201
        self.read.add(name)
        return super().get_slice(name, dim, start, stop, **kw)


def param_bytes(stage: StageModel) -> int:
    return sum(p.numel() * p.element_size() for p in stage.parameters())


def test_middle_stage_reads_only_its_layers(model_dir: Path) -> None:
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    reader = RecordingReader(model_dir)
    stage = StageModel(cfg, start=1, end=2)
    stage.load(reader)
    assert reader.read and all(name.startswith("model.layers.1.") for name in reader.read), sorted(reader.read)
    assert stage.embedding is None and stage.head is None


def test_first_and_last_stages_hold_embedding_and_head(model_dir: Path) -> None:
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    first, last = RecordingReader(model_dir), RecordingReader(model_dir)
    StageModel(cfg, start=0, end=1).load(first)
    StageModel(cfg, start=2, end=3).load(last)
    assert "model.embed_tokens.weight" in first.read and "lm_head.weight" not in first.read
    assert {"model.norm.weight", "lm_head.weight"} <= last.read and "model.embed_tokens.weight" not in last.read
    assert not any(n.startswith(("model.layers.0.", "model.layers.1.")) for n in last.read)


def test_stage_memory_grows_with_its_layers(tmp_path: Path) -> None:
    four = make_random_model("llama-gqa-tied", tmp_path / "m")  # 4 layers
    cfg = ModelConfig.from_hf(load_hf_config(four))
    one, two = StageModel(cfg, start=1, end=2), StageModel(cfg, start=1, end=3)
    assert param_bytes(two) == 2 * param_bytes(one)
    whole = StageModel(cfg, start=0, end=4)
    assert param_bytes(one) < param_bytes(whole) / 4


def test_bad_layer_range_is_a_clear_error(model_dir: Path) -> None:
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    with pytest.raises(ConfigError, match=r"layer range \[2, 5\) is not within the model's 3 layers"):
        StageModel(cfg, start=2, end=5)


def test_even_split() -> None:
    assert even_split(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert even_split(5, 2) == [(0, 2), (2, 5)] or even_split(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(ConfigError, match="stages=4"):
        even_split(3, 4)


def test_kv_slots_from_memory() -> None:
    per_slot = KVCacheSpec.bytes_per_slot_for(30, 3, 64, 2048, torch.float32)
    assert per_slot == 2 * 30 * 3 * 64 * 2048 * 4
    assert slots_for_memory(10 * per_slot, 0.5, per_slot) == 5
    assert slots_for_memory(10 * per_slot, 0.5, per_slot, max_slots=3) == 3
    with pytest.raises(ConfigError, match="one sequence slot needs"):
        slots_for_memory(per_slot, 0.5, per_slot)
    with pytest.raises(ConfigError, match="fraction=1.5"):
        slots_for_memory(per_slot, 1.5, per_slot)


def test_engine_sizes_slots_from_free_memory(model_dir: Path) -> None:
    llm = LLM(EngineConfig(model=str(model_dir), max_seq_len=64, kv_memory_fraction=0.01, max_slots=5),
              load_tokenizer=False)
    assert llm.num_slots == 5  # plenty of host memory for a tiny model: capped by max_slots
    assert llm.kv_cache_spec()[0].num_slots == 5


def test_step_meta_validation() -> None:
    with pytest.raises(ValueError, match="lengths must be >= 1"):
        StepMeta.build([0], [0], [0])
    with pytest.raises(ValueError, match="equal, non-empty"):
        StepMeta.build([0, 1], [0], [1])
    with pytest.raises(ValueError, match="slot appears twice"):
        StepMeta.build([2, 2], [0, 5], [3, 1])
    meta = StepMeta.build([3, 1, 4], [5, 0, 2], [1, 4, 1])  # decode, prefill, decode: packed, no padding
    assert meta.num_tokens == 6
    assert meta.write_slots.tolist() == [3, 1, 1, 1, 1, 4]
    assert meta.positions.tolist() == [5, 0, 1, 2, 3, 2]
    assert meta.last_index.tolist() == [0, 4, 5]
    assert meta.decode_rows == [0, 2] and meta.decode_index.tolist() == [0, 5] and meta.decode_kv_len == 6
    assert meta.decode_mask[:, 0, 0].tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    assert len(meta.segments) == 1 and meta.segments[0].mask is None  # a prompt from 0: plain causal


def test_sequence_longer_than_the_model_allows(model_dir: Path) -> None:
    llm = LLM(EngineConfig(model=str(model_dir), num_slots=1, max_seq_len=1024), load_tokenizer=False)
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings=512"):
        llm.forward([0], [0], [[1] * 600])


def test_prompt_plus_max_tokens_over_max_seq_len(model_dir: Path) -> None:
    from engine.sampling import SamplingParams

    llm = LLM(EngineConfig(model=str(model_dir), num_slots=1, max_seq_len=32), load_tokenizer=False)
    with pytest.raises(ConfigError, match="exceeds max_seq_len=32"):
        llm.generate([[1] * 30], SamplingParams(max_tokens=8))


def test_parse_dtype() -> None:
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    with pytest.raises(ConfigError, match="unsupported dtype 'int4'"):
        parse_dtype("int4")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_tracks_fp32(model_dir: Path, dtype: str) -> None:
    """bf16/fp16 runs are not bit-exact; their logits stay near the fp32 reference and agree on top-1."""
    ref = load_reference(model_dir)
    llm = LLM(EngineConfig(model=str(model_dir), dtype=dtype, num_slots=1, max_seq_len=128), load_tokenizer=False)
    ids = random_prompts(ref.config.vocab_size, [32])[0]
    ours = llm.forward([0], [0], [ids], all_logits=True)[0].float()
    want = reference_logits(ref, ids)
    rel = float((ours - want).norm() / want.norm())
    assert rel < (0.03 if dtype == "bfloat16" else 0.01), rel
    agree = float((ours.argmax(-1) == want.argmax(-1)).float().mean())
    assert agree >= 0.9, agree
