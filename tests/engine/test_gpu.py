"""Tier 5: the engine on CUDA against transformers on the same GPU (skipped without CUDA).

fp32 must match as on CPU; bf16/fp16 are compared with transformers in the same dtype on the same
device: logits within a relative error typical of 16-bit arithmetic, and greedy tokens agreeing until
the first near-tie (reported, not hidden).
"""

from __future__ import annotations

import pytest
import torch

from engine.llm import LLM, EngineConfig
from engine.sampling import SamplingParams
from tests.engine.reference import make_random_model, reference_greedy
from tests.engine.test_fidelity import NEW_TOKENS, assert_logits_close, random_prompts

pytestmark = pytest.mark.gpu


def load_reference_on(model_dir, dtype: torch.dtype):  # noqa: ANN001, ANN201
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True).cuda().eval()


@torch.no_grad()
def logits_on(model, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    return model(torch.tensor([ids], device="cuda")).logits[0].float()


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-bias", "opt"])
def test_cuda_fp32_matches_transformers(tmp_path, name: str) -> None:
    model_dir = make_random_model(name, tmp_path / name)
    ref = load_reference_on(model_dir, torch.float32)
    llm = LLM(EngineConfig(model=str(model_dir), device="cuda", num_slots=4, max_seq_len=160), load_tokenizer=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    for ids in random_prompts(ref.config.vocab_size, [5, 37]):
        assert_logits_close(llm.forward([0], [0], [ids], all_logits=True)[0].float(), logits_on(ref, ids))
        out = llm.generate([ids], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[0]
        cpu_ref = reference_greedy(ref.cpu(), ids, NEW_TOKENS)
        ref.cuda()
        assert out.token_ids == cpu_ref


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_tracks_transformers(tmp_path, dtype: str) -> None:
    model_dir = make_random_model("llama3-rope", tmp_path / "m")
    torch_dtype = getattr(torch, dtype)
    ref = load_reference_on(model_dir, torch_dtype)
    llm = LLM(EngineConfig(model=str(model_dir), device="cuda", dtype=dtype, num_slots=4, max_seq_len=160),
              load_tokenizer=False)
    for ids in random_prompts(ref.config.vocab_size, [9, 40]):
        ours, want = llm.forward([0], [0], [ids], all_logits=True)[0].float(), logits_on(ref, ids)
        rel = float((ours - want).norm() / want.norm())
        assert rel < 0.02, f"{dtype}: relative logit error {rel:.4f}"
        agree = float((ours.argmax(-1) == want.argmax(-1)).float().mean())
        assert agree >= 0.9, f"{dtype}: top-1 agreement {agree:.2f}"


def test_cuda_batch_and_stages(tmp_path) -> None:
    model_dir = make_random_model("mistral-window", tmp_path / "m")
    cpu = LLM(EngineConfig(model=str(model_dir), num_slots=4, max_seq_len=160), load_tokenizer=False)
    gpu = LLM(EngineConfig(model=str(model_dir), device="cuda", stages=3, num_slots=4, max_seq_len=160),
              load_tokenizer=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = random_prompts(cpu.model_cfg.vocab_size, [3, 30, 17])
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in gpu.generate(prompts, params)] == [o.token_ids for o in cpu.generate(prompts, params)]
