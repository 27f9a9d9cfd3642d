"""Fused Triton kernels for decode steps on CUDA: fewer, fuller kernels per layer.

A decode step of a Llama layer at batch 1 is four weight-bound matrix products and, in plain PyTorch,
about 25 small kernels around them (RoPE, cache writes, an index_select copy of the keys and values,
dtype casts, the masked softmax, SiLU times up). Each small kernel costs a few microseconds even inside
a CUDA graph, which on an 8B shape added up to about a third of the step. Here they are three:

- ``rope_and_write``: rotates q and k with the step's cos/sin tables (engine/models/common.py Rotary)
  and writes k and v into each row's slot of the KV cache at its position; returns the rotated q.
- ``decode_attention``: each row's query heads against the keys 0..position of its slot, read in place
  from the cache (no gather copy), online softmax in fp32; the keys can be split across programs
  (flash-decoding) with a small second kernel that merges the splits. The length each row reads comes
  from the device, so one CUDA graph serves every context length up to the cache's.
- ``silu_mul``: ``silu(gate) * up`` of the fused gate/up projection's output.
- ``rms_norm``: one program per row.

With these, and the residual adds done by the matrix products of the output and down projections
(``torch.addmm``, ShardedLinear ``fuse_residual``), a layer's decode step is 9 kernels instead of about 29.

Arithmetic: products and sums in fp32, one rounding to the storage dtype at the end (the PyTorch path
rounds after each op, so the two differ within 16-bit rounding). fp32 models keep exact fp32 dots
(``input_precision="ieee"``, not tf32).

Triton is imported only when a CUDA step asks for these kernels (``available``); without it the PyTorch
path runs. On CPU, ``TRITON_INTERPRET=1`` runs the same kernels through Triton's interpreter, which is how
the CPU tests check them (tests/engine/test_kernels.py).
"""

from __future__ import annotations

import functools
import os

import torch

MIN_DOT = 16  # tl.dot needs every dimension >= 16
BLOCK_N = 64  # keys per iteration of the attention loop
SPLIT_MIN_KEYS = 256  # a split of the keys gets at least this many (a context bucket's worth)
TARGET_PROGRAMS = 264  # about two programs per multiprocessor of an H100/H200


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(device: torch.device) -> bool:
    """Whether a stage on ``device`` should use the fused kernels: CUDA with Triton installed. (The CPU
    tests run them through the interpreter by setting ``StageModel.fused_kernels`` themselves.)"""
    return device.type == "cuda" and _triton_ok()


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_splits(batch: int, kv_heads: int, context: int) -> int:
    """How many programs share one (row, kv head)'s keys: enough to fill the GPU, each with at least
    ``SPLIT_MIN_KEYS`` keys of a ``context``-long bucket."""
    by_keys = max(1, context // SPLIT_MIN_KEYS)
    by_grid = max(1, -(-TARGET_PROGRAMS // max(1, batch * kv_heads)))
    return max(1, min(by_keys, by_grid, 32))


@functools.cache
def _kernels():  # noqa: ANN202 - the jitted kernels, imported on first use (after TRITON_INTERPRET is known)
    from engine import _triton_kernels as k

    return k.rope_write_kernel, k.attention_kernel, k.merge_kernel, k.silu_mul_kernel, k.rms_norm_kernel


def rope_and_write(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, positions: torch.Tensor,
                   slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, num_heads: int,
                   num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv [B, (heads + 2 * kv_heads) * d] of one decode token per row; ``rope`` = (cos, signed sin), each
    [B, 1, d] (None: no rotation); ``k_cache``/``v_cache`` one layer's [slots, kv_heads, positions, d].
    Writes each row's k and v at (slots[b], positions[b]); returns the rotated q [B, heads, d]."""
    rows = qkv.shape[0]
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("rope_and_write needs qkv and the cache contiguous in the head dimension")
    q = torch.empty(rows, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    cos, sin = rope if rope is not None else (q, q)  # unused without ROTARY
    rope_kernel = _kernels()[0]
    rope_kernel[(rows, num_heads + num_kv_heads)](
        qkv, cos, sin, positions, slots, q, k_cache, v_cache,
        qkv.stride(0), cos.stride(0) if rope is not None else 0, q.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV=num_kv_heads, D=head_dim, BLOCK_D=_pow2(head_dim), ROTARY=rope is not None)
    return q


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, *, scale: float, window: int | None, splits: int = 1) -> torch.Tensor:
    """Each row's q [B, heads, d] against keys 0..positions[b] (within ``window`` if given) of its slot in
    one layer's cache [slots, kv_heads, positions, d]. Returns [B, heads * d] in q's dtype."""
    rows, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    block_d = max(MIN_DOT, _pow2(dim))
    out = torch.empty(rows, heads * dim, dtype=q.dtype, device=q.device)
    if splits > 1:
        splits = _pow2(splits)
        part = torch.empty(rows * heads * splits, block_d, dtype=torch.float32, device=q.device)
        ml = torch.empty(rows * heads * splits, 2, dtype=torch.float32, device=q.device)
    else:
        part = ml = out  # unused
    attention, merge = _kernels()[1:3]
    attention[(rows, kv_heads, splits)](
        q, k_cache, v_cache, slots, positions, out, part, ml, scale, window or 0,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=heads, GROUP=group, G_PAD=max(MIN_DOT, _pow2(group)), D=dim, BLOCK_D=block_d, BLOCK=BLOCK_N,
        SPLITS=splits, HAS_WINDOW=window is not None, IEEE=q.dtype == torch.float32,
        INTERPRET=interpreted())
    if splits > 1:
        merge[(rows * heads,)](part, ml, out, D=dim, BLOCK_D=block_d, SPLITS=splits)
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] of shape [N, 2 * inter]; returns [N, inter]."""
    rows, width = x.shape
    inter = width // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    block = min(1024, _pow2(inter))
    _kernels()[3][(rows, -(-inter // block))](x, out, inter, x.stride(0), out.stride(0), BLOCK=block)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of x [N, D] times ``weight`` [D]: fp32 inside, one rounding (as F.rms_norm does
    on CUDA, in one program per row: PyTorch's kernel took 6 us a row of 4096 on an H200)."""
    rows, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)
    _kernels()[4][(rows,)](x, weight, out, x.stride(0), out.stride(0), eps, D=dim, BLOCK_D=_pow2(dim))
    return out
