"""The fused decode kernels (engine/kernels.py) against plain PyTorch on fresh random inputs.

Without CUDA they run through Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are
built); on a GPU the same checks run compiled. Every output is poisoned first, so an element the kernel
fails to write shows up as NaN.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # before triton is imported: it reads the variable when its own kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from engine import kernels  # noqa: E402 - after TRITON_INTERPRET

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "an element was left unwritten (NaN poison) or the kernel made a NaN"
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def rope_tables(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = positions.float().cpu().unsqueeze(-1) * inv
    emb = torch.cat((freqs, freqs), -1).unsqueeze(1)
    sin = emb.sin()
    sin[..., : dim // 2].neg_()
    return emb.cos().to(dtype).to(DEVICE), sin.to(dtype).to(DEVICE)


def reference_attention(q, k_cache, v_cache, slots, positions, scale, window):  # noqa: ANN001, ANN201
    rows, heads, dim = q.shape
    group = heads // k_cache.shape[1]
    out = torch.empty(rows, heads, dim, dtype=torch.float64)
    for b in range(rows):
        pos = int(positions[b])
        lo = 0 if window is None else max(0, pos - window + 1)
        keys = k_cache[int(slots[b]), :, lo:pos + 1].double().repeat_interleave(group, 0)  # [heads, L, d]
        values = v_cache[int(slots[b]), :, lo:pos + 1].double().repeat_interleave(group, 0)
        w = torch.softmax(torch.einsum("hd,hld->hl", q[b].double(), keys) * scale, -1)
        out[b] = torch.einsum("hl,hld->hd", w, values)
    return out.reshape(rows, heads * dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,rotary", [(4, 2, 64, True), (6, 6, 32, False), (8, 1, 16, True)])
def test_rope_and_write(dtype: torch.dtype, heads: int, kv_heads: int, dim: int, rotary: bool) -> None:
    torch.manual_seed(heads * dim)
    rows, slots_n, length = 3, 5, 40
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, dtype=dtype, device=DEVICE)
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    positions = torch.tensor([0, 17, 39], device=DEVICE)
    k_cache = torch.full((slots_n, kv_heads, length, dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    rope = rope_tables(positions, dim, dtype) if rotary else None
    q = kernels.rope_and_write(qkv, rope, positions, slots, k_cache, v_cache, num_heads=heads,
                               num_kv_heads=kv_heads, head_dim=dim)
    x = qkv.view(rows, -1, dim).float()
    if rotary:
        cos, sin = (t.float() for t in rope)
        x = x * cos + x.roll(dim // 2, dims=-1) * sin
    want_q, want_k, want_v = x.split((heads, kv_heads, kv_heads), dim=1)
    assert rel(q, want_q) < TOL[dtype]
    for b in range(rows):
        s, p = int(slots[b]), int(positions[b])
        assert rel(k_cache[s, :, p], want_k[b]) < TOL[dtype]
        assert torch.equal(v_cache[s, :, p], qkv.view(rows, -1, dim)[b, heads + kv_heads:])
    written = ~torch.isnan(k_cache[..., 0])
    assert int(written.sum()) == rows * kv_heads  # nothing else in the cache was touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("heads,kv_heads,dim,window", [(8, 2, 64, None), (4, 4, 32, None), (6, 2, 16, 37),
                                                       (32, 8, 128, None)])
def test_decode_attention(dtype: torch.dtype, splits: int, heads: int, kv_heads: int, dim: int,
                          window: int | None) -> None:
    torch.manual_seed(splits * 100 + heads)
    rows, slots_n, length = 4, 6, 300
    q = torch.randn(rows, heads, dim, dtype=dtype, device=DEVICE)
    k_cache = torch.randn(slots_n + 1, kv_heads, length, dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    slots = torch.tensor([5, 0, 3, 6], device=DEVICE)
    positions = torch.tensor([0, 63, 64, 299], device=DEVICE)  # one key, a block edge, past it, the end
    scale = 1 / math.sqrt(dim)
    got = kernels.decode_attention(q, k_cache, v_cache, slots, positions, scale=scale, window=window,
                                   splits=splits)
    want = reference_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), slots.cpu(), positions.cpu(), scale, window)
    assert got.shape == (rows, heads * dim) and got.dtype == dtype
    assert rel(got.cpu(), want) < TOL[dtype]


def test_keys_past_the_position_are_ignored() -> None:
    """Garbage (even NaN) beyond a row's position must not reach its output."""
    q = torch.randn(1, 4, 32, device=DEVICE)
    k_cache = torch.randn(1, 2, 128, 32, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    clean = kernels.decode_attention(q, k_cache, v_cache, torch.tensor([0], device=DEVICE),
                                     torch.tensor([70], device=DEVICE), scale=0.2, window=None, splits=2)
    k_cache[:, :, 71:] = float("nan")
    v_cache[:, :, 71:] = float("nan")
    dirty = kernels.decode_attention(q, k_cache, v_cache, torch.tensor([0], device=DEVICE),
                                     torch.tensor([70], device=DEVICE), scale=0.2, window=None, splits=2)
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype: torch.dtype) -> None:
    x = torch.randn(3, 2 * 1500, dtype=dtype, device=DEVICE) * 3
    gate, up = x.float().chunk(2, dim=-1)
    assert rel(kernels.silu_mul(x), torch.nn.functional.silu(gate) * up) < TOL[dtype]


def test_num_splits() -> None:
    assert kernels.num_splits(1, 8, 64) == 1  # short context: one program per (row, kv head)
    assert kernels.num_splits(1, 8, 4096) == 16  # long context at batch 1: split to fill the GPU
    assert kernels.num_splits(32, 8, 4096) == 2  # a full batch fills it already


@pytest.mark.parametrize("family", ["llama-gqa-tied", "mistral-window", "qwen2-bias", "opt"])
def test_fused_static_decode_equals_the_eager_step(family: str, tmp_path) -> None:  # noqa: ANN001
    """A whole stage's padded static decode step through the fused kernels (the CUDA-graph path, run
    eagerly) gives the eager step's logits and cache, over several steps that read what earlier ones
    wrote; padding rows write only the spare slot."""
    from engine.graphs import DecodeGraphs
    from engine.stage import StageModel
    from tests.engine.reference import make_random_model

    stage = StageModel.from_pretrained(make_random_model(family, tmp_path), device=DEVICE)
    plain = stage.new_cache(num_slots=6, max_seq_len=96)
    fused = stage.new_cache(num_slots=6, max_seq_len=96, spare_slots=1)
    prompts = {0: [5, 9, 2, 7], 2: [8, 8, 1, 4, 6, 2, 9], 3: [3]}
    for cache in (plain, fused):
        for slot, ids in prompts.items():
            stage(torch.tensor(ids, device=DEVICE), stage.make_meta([slot], [0], [len(ids)]), cache)
    want_steps = []
    rows, starts = [2, 0, 3], [len(prompts[r]) for r in (2, 0, 3)]
    tokens = torch.tensor([21, 22, 23], device=DEVICE)
    for _ in range(3):
        want = stage(tokens, stage.make_meta(rows, starts, [1] * 3), plain)
        want_steps.append((list(starts), tokens, want))
        tokens, starts = want.argmax(-1), [s + 1 for s in starts]
    stage.use_fused_kernels()  # what optimize_kernels does on CUDA
    graphs = DecodeGraphs(stage, fused, capture=DEVICE == "cuda")
    for step_starts, step_tokens, want in want_steps:
        got = graphs.run(rows, step_starts, step_tokens)
        assert rel(got.float().cpu(), want.float().cpu()) < 1e-5
    spec = plain.spec
    assert rel(fused.k[:, :spec.num_slots].cpu(), plain.k.cpu()) < 1e-5
    assert rel(fused.v[:, :spec.num_slots].cpu(), plain.v.cpu()) < 1e-5
    assert fused.k[:, spec.num_slots].abs().sum() > 0  # the padding row (3 rows -> bucket 4) wrote the spare
    assert all(g.meta.fused for g in graphs.graphs.values())
    fused_sites = [m for m in stage.modules() if getattr(m, "fuse_residual", False)]
    # Llama-family layers add both residuals in the products; OPT's biased projections cannot.
    assert len(fused_sites) == (0 if family == "opt" else 2 * len(stage.layers))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 100])
def test_rms_norm(dtype: torch.dtype, dim: int) -> None:
    x = torch.randn(5, dim, dtype=dtype, device=DEVICE) * 4
    w = torch.randn(dim, dtype=dtype, device=DEVICE)
    xf = x.float()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    assert rel(kernels.rms_norm(x, w, 1e-5), want) < TOL[dtype]
