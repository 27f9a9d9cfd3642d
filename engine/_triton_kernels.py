"""The Triton kernels behind engine/kernels.py (imported only when they are used: Triton is optional).

A module of its own so that the kernels are module-level functions, which Triton's interpreter needs.
"""

import triton
import triton.language as tl


@triton.jit
def rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                      stride_qkv, stride_rope, stride_q_row, stride_c_slot, stride_c_head, stride_c_pos,
                      NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      ROTARY: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)  # q heads first, then k heads (whose programs also move v)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    base = qkv_ptr + row * stride_qkv + head * D
    x = tl.load(base + d, mask=dmask, other=0.0).to(tl.float32)
    if ROTARY:
        # x * cos + rotate_half(x) * sin, where the table's sin carries rotate_half's sign: the rolled
        # x is (x2, x1).
        rolled = tl.load(base + (d + D // 2) % D, mask=dmask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + row * stride_rope + d, mask=dmask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + row * stride_rope + d, mask=dmask, other=0.0).to(tl.float32)
        x = x * c + rolled * s
    if head < NUM_HEADS:
        tl.store(q_ptr + row * stride_q_row + head * D + d, x.to(q_ptr.dtype.element_ty), mask=dmask)
    else:
        kv_head = head - NUM_HEADS
        pos = tl.load(pos_ptr + row)
        slot = tl.load(slot_ptr + row)
        at = slot * stride_c_slot + kv_head * stride_c_head + pos * stride_c_pos + d
        tl.store(k_cache_ptr + at, x.to(k_cache_ptr.dtype.element_ty), mask=dmask)
        v = tl.load(qkv_ptr + row * stride_qkv + (NUM_HEADS + NUM_KV + kv_head) * D + d, mask=dmask)
        tl.store(v_cache_ptr + at, v.to(v_cache_ptr.dtype.element_ty), mask=dmask)

@triton.jit
def _attend_block(q, k_ptr, v_ptr, base, n0, end, d, dmask, scale, stride_c_pos, m_i, l_i, acc,
                  BLOCK: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """Keys and values n0..n0+BLOCK (those < end) into the running softmax (m_i, l_i) and sum acc.
    (Triton's interpreter multiplies 16-bit floats' raw bits in tl.dot: it gets fp32 operands.)"""
    n = n0 + tl.arange(0, BLOCK)
    nmask = n < end
    at = base + n[:, None] * stride_c_pos + d[None, :]
    kv_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(k_ptr + at, mask=kv_mask, other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(nmask[None, :], s * scale, float("-inf"))  # [G_PAD, BLOCK]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + at, mask=kv_mask, other=0.0)
    p16 = p.to(v.dtype)  # P @ V in the storage dtype, as the PyTorch path does
    if INTERPRET:
        p16 = p16.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        pv = tl.dot(p16, v, input_precision="ieee")
    else:
        pv = tl.dot(p16, v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def attention_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, out_ptr, part_ptr, ml_ptr, scale, window,
                     stride_q_row, stride_c_slot, stride_c_head, stride_c_pos,
                     NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    pos = tl.load(pos_ptr + row)
    slot = tl.load(slot_ptr + row)
    length = pos + 1
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos - window + 1, 0)  # keys > pos - window
    per = ((length - lo + SPLITS - 1) // SPLITS + BLOCK - 1) // BLOCK * BLOCK
    start = lo + split * per
    end = tl.minimum(start + per, length)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    gmask = g < GROUP
    dmask = d < D
    q = tl.load(q_ptr + row * stride_q_row + heads[:, None] * D + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.full([G_PAD], 0.0, tl.float32)
    acc = tl.full([G_PAD, BLOCK_D], 0.0, tl.float32)
    base = slot * stride_c_slot + kv_head * stride_c_head
    if INTERPRET:  # Triton's interpreter takes no loaded value as a range() bound
        n0 = start
        while n0 < end:
            m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, base, n0, end, d, dmask, scale, stride_c_pos, m_i, l_i,
                                          acc, BLOCK, IEEE, INTERPRET)
            n0 += BLOCK
    else:
        for n0 in range(start, end, BLOCK):
            m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, base, n0, end, d, dmask, scale, stride_c_pos, m_i, l_i,
                                          acc, BLOCK, IEEE, INTERPRET)
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + row * NUM_HEADS * D + heads[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])
    else:
        at = (row * NUM_HEADS + heads) * SPLITS + split  # [G_PAD]
        tl.store(part_ptr + at[:, None] * BLOCK_D + d[None, :], acc, mask=gmask[:, None])
        tl.store(ml_ptr + at * 2, m_i, mask=gmask)
        tl.store(ml_ptr + at * 2 + 1, l_i, mask=gmask)

@triton.jit
def merge_kernel(part_ptr, ml_ptr, out_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    head_row = tl.program_id(0)  # row * NUM_HEADS + head
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    at = head_row * SPLITS + sp
    m = tl.load(ml_ptr + at * 2)
    l_ = tl.load(ml_ptr + at * 2 + 1)
    top = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))  # an empty split weighs nothing
    acc = tl.load(part_ptr + at[:, None] * BLOCK_D + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_ * w, 0)
    tl.store(out_ptr + head_row * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)

@triton.jit
def silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, eps, D: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    x = tl.load(x_ptr + row * stride_x + d, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    tl.store(out_ptr + row * stride_out + d, (x * inv * w).to(out_ptr.dtype.element_ty), mask=mask)
