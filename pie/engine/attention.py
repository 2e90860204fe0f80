"""Attention over paged KV for a ragged batch: the torch (CPU, and reference) backend.

`prepare` turns a ForwardBatch into index tensors once per step; every layer then writes its new
K/V into the pages and attends. Sequences are grouped so single-token decodes are not padded up
to a prefill's length:

    group "decode": every sequence with one new token   -> bf16 or float32 on CPU: one C kernel
                    call that reads the pages in place (cpu_kernels / cpu_kernels_f32
                    .decode_attention); otherwise two batched matmuls over gathered K/V,
                    q [B*KH, G, D]
    group "other":  prefill chunks, multi-token appends  -> SDPA on q [B, H, Qmax, D] (padded)

The KV cache of one layer is [num_pages, page_size, kv_heads, head_dim]; viewed flat, slot s of
a sequence is row `page_ids[s // page_size] * page_size + s % page_size`, and head h of that slot
is row `row * kv_heads + h` of the cache viewed as [P * page_size * KH, D]. Gathering by those
head rows in [B, KH, L] order gives K/V already laid out per head, contiguous, in one
`index_select` (advanced indexing costs ~8x more, and permuted views make `bmm` copy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pie.engine import cpu_kernels, cpu_kernels_f32
from pie.engine.request import ForwardBatch, SequenceForward

# Decode reads are padded (masked) to a multiple of this many slots: oneDNN builds a kernel for
# every new matmul shape (~0.4 ms each, 25x the matmul itself), so a length that grows by one
# every step must not be a new shape every step.
DECODE_KV_BUCKET = 64
# A step of at most this many new tokens runs as that many one-token rows (a sequence's token i
# reading slots 0..context+i), on the decode path: its kernels write every row's K/V before any
# row attends, so this is the multi-token attention exactly, and on CPU the step is one C call
# for all layers instead of a dozen torch ops per layer (a 9-token draft check cost 3.8x a
# one-token step that way; see bench/RESULTS.md). Long prefills keep the batched path.
ROWS_MAX_TOKENS = 12
# Below this many slots read per decode group, low-precision decode attention runs in float32:
# oneDNN's bf16 batched matmul costs ~15 us a call however small, MKL's float32 one ~5 us, and
# the casts are cheap while the gathered K/V are small. Above it bf16 matmuls win.
DECODE_FLOAT32_MAX_READS = 1024


@dataclass(slots=True)
class AttentionGroup:
    token_rows: torch.Tensor | None  # [N] rows of the flat token batch; None = all rows, in order
    query_rows: torch.Tensor | None  # [N] rows of the padded [B * Qmax] grid; None = no padding
    batch: int
    q_max: int
    kv_len: int  # Lmax
    kv_rows: torch.Tensor  # [B, Lmax] flat cache rows each sequence reads (padding -> row 0)
    kv_lens: torch.Tensor  # [B] slots each sequence reads
    mask: torch.Tensor | None  # [B, 1, Qmax, Lmax] bool, True = attend; None = attend all
    causal: bool  # mask is exactly SDPA's top-left causal mask (no context, no padding)
    # Built by the first layer that needs them, then reused by the rest of the step:
    head_rows: torch.Tensor | None = None  # [B * KH * Lmax] rows of the [P*page_size*KH, D] view
    bias: torch.Tensor | None = None  # decode: the mask as an additive -inf bias [B*KH, 1, Lmax]


@dataclass(slots=True)
class AttentionMetadata:
    slot_rows: torch.Tensor  # [T] flat cache row each new token's K/V is written to
    groups: list[AttentionGroup]
    num_tokens: int


def sequence_cache_rows(page_ids: list[int], length: int, page_size: int) -> np.ndarray:
    """Flat cache rows of slots 0..length-1 of one sequence."""
    slots = np.arange(length, dtype=np.int64)
    pages = np.asarray(page_ids, dtype=np.int64)[slots // page_size]
    return pages * page_size + slots % page_size


class TorchAttention:
    """Gather-then-attend over paged KV; correct for any mask, used on CPU and as the reference."""

    name = "torch"

    def prepare(
        self, batch: ForwardBatch, page_size: int, device: torch.device
    ) -> AttentionMetadata:
        seqs = batch.sequences
        tokens = sum(len(s.tokens) for s in seqs)
        if tokens == len(seqs) or tokens <= ROWS_MAX_TOKENS:
            group, slot_rows = _decode_group(seqs, page_size, device)
            return AttentionMetadata(slot_rows=slot_rows, groups=[group], num_tokens=tokens)
        return self._prepare_groups(batch, page_size, device)

    def _prepare_groups(
        self, batch: ForwardBatch, page_size: int, device: torch.device
    ) -> AttentionMetadata:
        """Any batch: its decodes and its other sequences as two groups (either may be absent)."""
        seqs = batch.sequences
        starts = np.cumsum([0] + [len(s.tokens) for s in seqs])
        slot_rows = np.concatenate(
            [
                sequence_cache_rows(s.page_ids, s.context_len + len(s.tokens), page_size)[
                    s.context_len :
                ]
                for s in seqs
            ]
        )
        decode = [i for i, s in enumerate(seqs) if len(s.tokens) == 1]
        other = [i for i, s in enumerate(seqs) if len(s.tokens) != 1]
        groups = [
            self._group(batch, members, starts, page_size, device)
            for members in (decode, other)
            if members
        ]
        return AttentionMetadata(
            slot_rows=torch.from_numpy(slot_rows).to(device),
            groups=groups,
            num_tokens=int(starts[-1]),
        )

    def _group(
        self,
        batch: ForwardBatch,
        members: list[int],
        starts: np.ndarray,
        page_size: int,
        device: torch.device,
    ) -> AttentionGroup:
        seqs = [batch.sequences[i] for i in members]
        q_lens = np.array([len(s.tokens) for s in seqs])
        kv_lens = np.array([s.context_len + len(s.tokens) for s in seqs])
        q_max, kv_max = int(q_lens.max()), int(kv_lens.max())
        if q_max == 1:
            kv_max = -(-kv_max // DECODE_KV_BUCKET) * DECODE_KV_BUCKET
        kv_rows = np.zeros((len(seqs), kv_max), dtype=np.int64)
        # mask[b, i, j]: new token i of sequence b attends to slot j
        j = np.arange(kv_max)
        i = np.arange(q_max)
        ctx = kv_lens - q_lens
        mask = j[None, None, :] <= (ctx[:, None, None] + i[None, :, None])
        mask &= j[None, None, :] < kv_lens[:, None, None]
        custom = False
        token_rows, query_rows = [], []
        for b, (s, member) in enumerate(zip(seqs, members, strict=True)):
            n, length = len(s.tokens), s.context_len + len(s.tokens)
            kv_rows[b, :length] = sequence_cache_rows(s.page_ids, length, page_size)
            if s.attention_mask is not None:
                mask[b, :n, :length] = s.attention_mask
                custom = True
            token_rows.append(np.arange(starts[member], starts[member] + n))
            query_rows.append(b * q_max + np.arange(n))
        mask[:, :, 0] |= ~mask.any(axis=2)  # padded query rows: attend slot 0, never NaN
        full = bool(mask.all())
        causal = not custom and bool((ctx == 0).all()) and bool((q_lens == q_max).all())
        flat_tokens = np.concatenate(token_rows)
        in_order = len(flat_tokens) == int(starts[-1]) and bool(
            (flat_tokens == np.arange(len(flat_tokens))).all()
        )
        flat_queries = np.concatenate(query_rows)
        unpadded = len(flat_queries) == len(seqs) * q_max
        return AttentionGroup(
            token_rows=None if in_order else torch.from_numpy(flat_tokens).to(device),
            query_rows=None if unpadded else torch.from_numpy(flat_queries).to(device),
            batch=len(seqs),
            q_max=q_max,
            kv_len=kv_max,
            kv_rows=torch.from_numpy(kv_rows).to(device),
            kv_lens=torch.from_numpy(kv_lens.astype(np.int64)).to(device),
            mask=None if full else torch.from_numpy(mask[:, None]).to(device),
            causal=causal and not full,
        )

    @staticmethod
    def decode_rows(
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """What a decode attention kernel takes for a batch of one-token decodes, in order:
        kv_rows [B, Lmax], kv_lens [B], mask [B, Lmax] or None, slot_rows [B]; None for any
        other batch."""
        groups = meta.groups
        if len(groups) != 1 or groups[0].q_max != 1 or groups[0].token_rows is not None:
            return None
        g = groups[0]
        mask = None if g.mask is None else g.mask.view(g.batch, g.kv_len)
        return g.kv_rows, g.kv_lens, mask, meta.slot_rows

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KH, D]
        v: torch.Tensor,  # [T, KH, D]
        k_cache: torch.Tensor,  # [P, page_size, KH, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        kv_heads, dim = k_cache.shape[2], k_cache.shape[3]
        k_flat = k_cache.view(-1, kv_heads, dim)  # [P * page_size, KH, D]
        v_flat = v_cache.view(-1, kv_heads, dim)
        groups = meta.groups
        decode = self.decode_rows(meta)
        if decode is not None and _use_decode_kernel(q, k_cache, v, kv_heads, dim):
            # all decodes: one kernel call writes the new K/V and attends
            return _decode_kernel(q)(q, k_flat, v_flat, *decode[:3], scale, (k, v, decode[3]))
        k_flat.index_copy_(0, meta.slot_rows, k if k.dtype == k_flat.dtype else k.to(k_flat.dtype))
        v_flat.index_copy_(0, meta.slot_rows, v if v.dtype == v_flat.dtype else v.to(v_flat.dtype))
        k_heads = k_cache.view(-1, dim)  # [P * page_size * KH, D]
        v_heads = v_cache.view(-1, dim)
        if len(groups) == 1 and groups[0].token_rows is None:
            return _attend(groups[0], q, k_heads, v_heads, kv_heads, scale)
        out = q.new_empty(q.shape)
        for g in groups:
            assert g.token_rows is not None  # with two groups, each names its rows
            og = _attend(g, q.index_select(0, g.token_rows), k_heads, v_heads, kv_heads, scale)
            out.index_copy_(0, g.token_rows, og)
        return out


def _decode_group(
    seqs: list[SequenceForward], page_size: int, device: torch.device
) -> tuple[AttentionGroup, torch.Tensor]:
    """The group of one-token rows, one row per new token, and the rows' slot rows: as `_group`
    builds them but vectorized over rows (its per-sequence numpy calls cost 1.2 ms a step at
    batch 32). Token i of a sequence with context c reads slots 0..c+i (causal) or, with an
    attention mask, its mask row over slots 0..c+n-1."""
    starts = np.cumsum([0] + [len(s.tokens) for s in seqs])
    n = int(starts[-1])
    owner = np.repeat(np.arange(len(seqs)), np.diff(starts))  # row -> its sequence
    slot = np.arange(n) - starts[owner] + np.array([s.context_len for s in seqs])[owner]
    custom_rows = np.array([s.attention_mask is not None for s in seqs])[owner]
    ends = np.array([s.context_len + len(s.tokens) for s in seqs])[owner]
    kv_lens = np.where(custom_rows, ends, slot + 1).astype(np.int64)  # a mask row may see ahead
    kv_max = -(-int(kv_lens.max()) // DECODE_KV_BUCKET) * DECODE_KV_BUCKET
    pages = np.zeros((n, -(-kv_max // page_size)), dtype=np.int64)
    for b in range(n):
        used = -(-int(kv_lens[b]) // page_size)
        pages[b, :used] = seqs[owner[b]].page_ids[:used]
    slots = np.arange(kv_max)
    mask = slots[None, :] < kv_lens[:, None]  # [B, Lmax]: causal for one new token
    kv_rows = np.where(mask, pages[:, slots // page_size] * page_size + slots % page_size, 0)
    mask = mask[:, None, :]  # [B, Qmax = 1, Lmax]
    for row in np.flatnonzero(custom_rows):
        s = seqs[owner[row]]
        assert s.attention_mask is not None
        mask[row, 0, : kv_lens[row]] = s.attention_mask[row - starts[owner[row]]]
    custom = bool(custom_rows.any())
    mask[:, :, 0] |= ~mask.any(axis=2)  # a row masked whole attends slot 0, never NaN
    full = bool(mask.all())
    group = AttentionGroup(
        token_rows=None,
        query_rows=None,
        batch=n,
        q_max=1,
        kv_len=kv_max,
        kv_rows=torch.from_numpy(kv_rows).to(device),
        kv_lens=torch.from_numpy(kv_lens).to(device),
        mask=None if full else torch.from_numpy(mask[:, None]).to(device),
        causal=not custom and bool((kv_lens == 1).all()) and not full,
    )
    return group, torch.from_numpy(kv_rows[np.arange(n), slot]).to(device)


def _use_decode_kernel(
    q: torch.Tensor, cache: torch.Tensor, v: torch.Tensor, kv_heads: int, dim: int
) -> bool:
    """CPU bf16 or float32 with its kernel library: a C decode attention can run this layer."""
    if q.device.type != "cpu" or not q.dtype == cache.dtype == v.dtype:
        return False
    if q.dtype == torch.float32:
        return cpu_kernels_f32.decode_attention_supported(q.shape[1], kv_heads, dim)
    return q.dtype == torch.bfloat16 and cpu_kernels.decode_attention_supported(
        q.shape[1], kv_heads, dim
    )


def _decode_kernel(q: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The decode attention kernel for q's dtype (see _use_decode_kernel)."""
    if q.dtype == torch.float32:
        return cpu_kernels_f32.decode_attention
    return cpu_kernels.decode_attention


def _gather(
    g: AttentionGroup,
    k_heads: torch.Tensor,
    v_heads: torch.Tensor,
    kv_heads: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # K, V: [B * KH, Lmax, D] each, contiguous
    if g.head_rows is None:  # slot row r, head h -> row r * KH + h, in [B, KH, L] order
        heads = torch.arange(kv_heads, device=g.kv_rows.device)
        g.head_rows = (g.kv_rows[:, None, :] * kv_heads + heads[None, :, None]).view(-1)
    dim = k_heads.shape[1]
    kg = k_heads.index_select(0, g.head_rows).view(g.batch * kv_heads, g.kv_len, dim)
    vg = v_heads.index_select(0, g.head_rows).view(g.batch * kv_heads, g.kv_len, dim)
    if kg.dtype != dtype:
        kg, vg = kg.to(dtype), vg.to(dtype)
    return kg, vg


def _attend(
    g: AttentionGroup,
    q: torch.Tensor,  # [N, H, D], this group's queries in order
    k_heads: torch.Tensor,  # [P * page_size * KH, D]
    v_heads: torch.Tensor,
    kv_heads: int,
    scale: float,
) -> torch.Tensor:  # [N, H, D]
    heads, dim = q.shape[1], q.shape[2]
    if g.q_max == 1 and _use_decode_kernel(q, k_heads, q, kv_heads, dim):
        mask = None if g.mask is None else g.mask.view(g.batch, g.kv_len)
        return _decode_kernel(q)(
            q,
            k_heads.view(-1, kv_heads, dim),
            v_heads.view(-1, kv_heads, dim),
            g.kv_rows,
            g.kv_lens,
            mask,
            scale,
        )
    if g.q_max == 1:
        if q.dtype != torch.float32 and g.batch * g.kv_len <= DECODE_FLOAT32_MAX_READS:
            kg, vg = _gather(g, k_heads, v_heads, kv_heads, torch.float32)
            return _decode_attention(g, q.float(), kg, vg, kv_heads, scale).to(q.dtype)
        kg, vg = _gather(g, k_heads, v_heads, kv_heads, q.dtype)
        return _decode_attention(g, q, kg, vg, kv_heads, scale)
    kg, vg = _gather(g, k_heads, v_heads, kv_heads, q.dtype)
    if g.query_rows is None:
        qg = q.view(g.batch, g.q_max, heads, dim)
    else:
        grid = q.new_zeros(g.batch * g.q_max, heads, dim)
        grid.index_copy_(0, g.query_rows, q)
        qg = grid.view(g.batch, g.q_max, heads, dim)
    og = F.scaled_dot_product_attention(
        qg.transpose(1, 2),  # [B, H, Qmax, D]
        kg.view(g.batch, kv_heads, g.kv_len, dim),
        vg.view(g.batch, kv_heads, g.kv_len, dim),
        attn_mask=None if g.causal else g.mask,
        is_causal=g.causal,
        scale=scale,
        enable_gqa=True,
    ).transpose(1, 2)  # [B, Qmax, H, D]
    if g.query_rows is None:
        return og.reshape(-1, heads, dim)
    return og.reshape(-1, heads, dim).index_select(0, g.query_rows)


def _decode_attention(
    g: AttentionGroup,
    q: torch.Tensor,  # [B, H, D], one query per sequence
    kg: torch.Tensor,  # [B * KH, L, D]
    vg: torch.Tensor,  # [B * KH, L, D]
    kv_heads: int,
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    # Two batched matmuls instead of SDPA: on CPU in bf16 this is ~10x faster at batch 32
    # (SDPA's CPU flash kernel pays per-query overhead that one-token queries cannot amortise).
    # Query heads are grouped by their KV head (HF's repeat_kv order: head h reads h // G).
    batch, heads, dim = q.shape
    qg = q.reshape(batch * kv_heads, heads // kv_heads, dim)  # [B*KH, G, D]
    if g.mask is None:
        scores = torch.bmm(qg, kg.transpose(1, 2)).mul_(scale)  # [B*KH, G, L]
    else:
        if g.bias is None or g.bias.dtype != q.dtype:
            g.bias = _mask_bias(g.mask, kv_heads, q.dtype)
        scores = torch.baddbmm(g.bias, qg, kg.transpose(1, 2), alpha=scale)
    # softmax in float32 as HF's eager attention does, then back to the model dtype
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs, vg).view(batch, heads, dim)


def _mask_bias(mask: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """A decode mask [B, 1, 1, L] as an additive bias [B * KH, 1, L]: 0 to attend, -inf not."""
    batch, length = mask.shape[0], mask.shape[-1]
    allowed = mask.view(batch, 1, 1, length).expand(batch, kv_heads, 1, length)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias.view(batch * kv_heads, 1, length)


ATTENTION_BACKENDS: dict[str, type] = {"torch": TorchAttention}
