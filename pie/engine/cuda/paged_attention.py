"""Triton kernels for attention over the paged KV cache: the KV store, prefill, and decode.

Same semantics as pie.engine.attention.TorchAttention (the reference): new token i of a sequence
sees slots j <= context_len + i, or exactly the slots its custom mask allows. The cache of one
layer is [P, page_size, KH, D]; slot s of sequence b lives in page block_table[b, s // page_size]
at offset s % page_size, and its head h at element ((row * KH) + h) * D of the flat cache.
Softmax is online, in float32, base 2 (scores pre-multiplied by scale * log2 e).

    decode:  grid (Bd, KH, S)  one program = all G query heads of one KV head, one context slice
    reduce:  grid (Bd, H)      merges the S slices by their log-sum-exp (only when S > 1)

Shapes and flags are compile-time constants; lengths, strides and the split count are runtime
values, so a serving run compiles each kernel a handful of times, not once per batch.
    prefill: grid (NB, H)      one program = BLOCK_M query rows of one sequence, one head
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pie.engine.cuda.metadata import TritonMetadata
from pie.engine.cuda.triton_utils import dot_precision, interpreting, mma, pow2

LOG2E = 1.4426950408889634
NEG_INF = tl.constexpr(float("-inf"))  # kernels may read only constexpr globals


# ---- KV store ------------------------------------------------------------------------------------
@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_rows_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    row = tl.load(slot_rows_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # row < 0 marks a padded token (CUDA-graph batches): it writes nothing. (The scalar test is
    # broadcast by hand: the interpreter rejects a scalar bool in a mask expression.)
    live = (offs_h * 0 + row) >= 0
    ok = live[:, None] & (offs_h[:, None] < KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    dst = (row * KV_HEADS + offs_h[:, None]) * HEAD_DIM + offs_d[None, :]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=ok)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kv(
    k: torch.Tensor,  # [T, KH, D], last dim contiguous
    v: torch.Tensor,  # [T, KH, D]
    k_cache: torch.Tensor,  # [P, page_size, KH, D], contiguous
    v_cache: torch.Tensor,
    slot_rows: torch.Tensor,  # [T] int32, -1 = skip
) -> None:
    tokens, kv_heads, dim = k.shape
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_rows,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        KV_HEADS=kv_heads, HEAD_DIM=dim, BLOCK_H=pow2(kv_heads), BLOCK_D=pow2(dim),
    )  # fmt: skip


# ---- decode: one query token per sequence, split-K over the context --------------------------------
@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    seq_ids_ptr, q_start_ptr, kv_lens_ptr, block_table_ptr, mask_off_ptr, mask_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, scale_log2, num_splits,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # num_splits is a runtime value (a new batch size must not recompile); SPLIT_K says > 1.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(seq_ids_ptr + b)
    row = tl.load(q_start_ptr + seq).to(tl.int64)  # the query token's row in the flat batch
    kv_len = tl.load(kv_lens_ptr + seq)
    # Slice of this split, sized from the live length so a fixed grid (CUDA graphs) still
    # divides any context evenly; slices past the end are empty and report lse = -inf.
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_h  # query heads reading this KV head (HF's repeat_kv order)
    h_ok = offs_h < GROUP
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_D]
    mask_off = -1
    if HAS_MASK:
        mask_off = tl.load(mask_off_ptr + seq)
    m_i = tl.full([BLOCK_H], NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < hi
        page = tl.load(block_table_ptr + seq * stride_bt + n // PAGE_SIZE, mask=n_ok, other=0)
        kv_row = (page.to(tl.int64) * PAGE_SIZE + n % PAGE_SIZE) * KV_HEADS + kvh
        kv_at = kv_row[:, None] * HEAD_DIM + offs_d[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_at, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = mma(q, tl.trans(k), UPCAST, PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N]
        allowed = n_ok
        if HAS_MASK:
            bits = tl.load(mask_ptr + mask_off + n, mask=n_ok & (n * 0 + mask_off >= 0), other=1)
            allowed = allowed & (bits != 0)
        s = tl.where(allowed[None, :], s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)  # a fully masked block: no NaN
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_at, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    hd_ok = h_ok[:, None] & d_ok[None, :]
    if SPLIT_K:
        part = (b * KV_HEADS * GROUP + heads) * num_splits + split  # [BLOCK_H] in [Bd, H, S]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=hd_ok)
        lse = tl.where(l_i == 0.0, NEG_INF, m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(part_lse_ptr + part, lse, mask=h_ok)
    else:
        dst = out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=hd_ok)


@triton.jit
def _reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, seq_ids_ptr, q_start_ptr, stride_ot, stride_oh,
    num_splits, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(q_start_ptr + tl.load(seq_ids_ptr + b)).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    base = (b * HEADS + h) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_ok, other=NEG_INF)  # [BLOCK_S]
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == NEG_INF, 0.0, m))  # empty slices weigh 0
    parts = tl.load(
        part_out_ptr + (base + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + row * stride_ot + h * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_ok,
    )


# ---- prefill: ragged query blocks, causal or custom mask ------------------------------------------
@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    blocks_ptr, q_start_ptr, kv_lens_ptr, block_table_ptr, mask_off_ptr, mask_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, scale_log2,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    seq = tl.load(blocks_ptr + 2 * blk)
    m0 = tl.load(blocks_ptr + 2 * blk + 1)
    q0 = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_start_ptr + seq + 1) - q0
    kv_len = tl.load(kv_lens_ptr + seq)
    ctx = kv_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)  # query index within the sequence
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    rows = (q0 + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    # causal rows stop at their own slot: the block's last row reads up to ctx + its index
    hi = tl.minimum(kv_len, ctx + tl.minimum(m0 + BLOCK_M, q_len))
    mask_off = -1
    if HAS_MASK:
        mask_off = tl.load(mask_off_ptr + seq)
        hi = tl.where(mask_off >= 0, kv_len, hi)  # a custom mask may look at any slot
    m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < hi
        page = tl.load(block_table_ptr + seq * stride_bt + n // PAGE_SIZE, mask=n_ok, other=0)
        kv_row = (page.to(tl.int64) * PAGE_SIZE + n % PAGE_SIZE) * KV_HEADS + kvh
        kv_at = kv_row[:, None] * HEAD_DIM + offs_d[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_at, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = mma(q, tl.trans(k), UPCAST, PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        allowed = n_ok[None, :] & (n[None, :] <= ctx + offs_m[:, None])
        if HAS_MASK:
            custom = (offs_m * 0 + mask_off) >= 0  # [BLOCK_M], the same for every row
            bits = tl.load(
                mask_ptr + mask_off + offs_m[:, None] * kv_len + n[None, :],
                mask=(custom & m_ok)[:, None] & n_ok[None, :],
                other=0,
            )
            allowed = tl.where(custom[:, None], n_ok[None, :] & (bits != 0), allowed)
        s = tl.where(allowed, s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_at, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    dst = out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ---- launchers -------------------------------------------------------------------------------------
def decode_attention(
    q: torch.Tensor,  # [T, H, D], last dim contiguous
    k_cache: torch.Tensor,  # [P, page_size, KH, D], contiguous
    v_cache: torch.Tensor,
    out: torch.Tensor,  # [T, H, D]: rows of the decode sequences are written
    meta: TritonMetadata,
    scale: float,
    block_n: int,
    num_warps: int = 4,
) -> None:
    assert meta.decode_seqs is not None and meta.num_splits is not None
    if k_cache.dtype == torch.float32:  # float32 tiles are twice the size: 32+ slots spill
        block_n = min(block_n, 16)
    heads, dim = q.shape[1], q.shape[2]
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    splits = meta.num_splits
    num = meta.num_decode
    if splits > 1 and (
        meta.partial_out is None or meta.partial_out.shape != (num, heads, splits, dim)
    ):
        meta.partial_out = torch.empty(
            (num, heads, splits, dim), dtype=torch.float32, device=q.device
        )
        meta.partial_lse = torch.empty((num, heads, splits), dtype=torch.float32, device=q.device)
    part_out = meta.partial_out if splits > 1 else out  # unused when splits == 1
    part_lse = meta.partial_lse if splits > 1 else out
    has_mask = meta.mask_off is not None
    _decode_kernel[(num, kv_heads, splits)](
        q, k_cache, v_cache, out, part_out, part_lse,
        meta.decode_seqs, meta.q_start, meta.kv_lens, meta.block_table,
        meta.mask_off if has_mask else meta.kv_lens, meta.mask if has_mask else meta.kv_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), meta.block_table.stride(0),
        scale * LOG2E, splits,
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=dim, PAGE_SIZE=page_size,
        BLOCK_H=pow2(group, 16), BLOCK_D=pow2(dim, 16), BLOCK_N=block_n, SPLIT_K=splits > 1,
        HAS_MASK=has_mask, UPCAST=interpreting(), PRECISION=dot_precision(k_cache.dtype),
        num_warps=num_warps,
    )  # fmt: skip
    if splits > 1:
        _reduce_kernel[(num, heads)](
            part_out, part_lse, out, meta.decode_seqs, meta.q_start, out.stride(0), out.stride(1),
            splits, HEADS=heads, HEAD_DIM=dim,
            BLOCK_S=pow2(splits, 16), BLOCK_D=pow2(dim),
        )  # fmt: skip


def prefill_attention(
    q: torch.Tensor,  # [T, H, D], last dim contiguous
    k_cache: torch.Tensor,  # [P, page_size, KH, D], contiguous
    v_cache: torch.Tensor,
    out: torch.Tensor,  # [T, H, D]: rows of the multi-token sequences are written
    meta: TritonMetadata,
    scale: float,
    block_m: int,
    block_n: int,
    num_warps: int = 8,
) -> None:
    """block_m must be the query-block step `meta.prefill_blocks` was built with."""
    assert meta.prefill_blocks is not None
    heads, dim = q.shape[1], q.shape[2]
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    has_mask = meta.mask_off is not None
    _prefill_kernel[(meta.num_prefill_blocks, heads)](
        q, k_cache, v_cache, out,
        meta.prefill_blocks, meta.q_start, meta.kv_lens, meta.block_table,
        meta.mask_off if has_mask else meta.kv_lens, meta.mask if has_mask else meta.kv_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), meta.block_table.stride(0),
        scale * LOG2E,
        KV_HEADS=kv_heads, GROUP=heads // kv_heads, HEAD_DIM=dim, PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(dim, 16), HAS_MASK=has_mask,
        UPCAST=interpreting(), PRECISION=dot_precision(k_cache.dtype), num_warps=num_warps,
    )  # fmt: skip
