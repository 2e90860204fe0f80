"""Decode attention computed the plain way, one head at a time: what the C kernels must match."""

from __future__ import annotations

import torch


def reference_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [rows, KH, D]
    v_cache: torch.Tensor,
    rows: torch.Tensor,  # [B, Lmax] cache row of each slot
    lens: torch.Tensor,  # [B] slots each sequence reads
    mask: torch.Tensor | None,  # [B, Lmax] True = attend
    scale: float,
    precision: torch.dtype = torch.float32,  # what the arithmetic runs in
) -> torch.Tensor:  # [B, H, D] float32
    batch, heads, dim = q.shape
    group = heads // k_cache.shape[1]
    out = torch.empty(batch, heads, dim)
    for b in range(batch):
        n = int(lens[b])
        k, v = k_cache[rows[b, :n]].to(precision), v_cache[rows[b, :n]].to(precision)
        for h in range(heads):
            s = (k[:, h // group] @ q[b, h].to(precision)) * scale
            if mask is not None:
                s = s.masked_fill(~mask[b, :n], float("-inf"))
            out[b, h] = (torch.softmax(s, -1) @ v[:, h // group]).float()
    return out


def random_decode_case(
    batch: int, heads: int, kv_heads: int, dim: int, l_max: int, masked: bool, dtype: torch.dtype
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None
]:
    """q (strided, as the model's is), k_cache, v_cache, rows, lens, mask for a kernel test."""
    gen = torch.Generator().manual_seed(batch * heads + dim)
    k_cache = torch.randn(1024, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(1024, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(batch, heads + 3, dim, generator=gen).to(dtype)[:, :heads]
    lens = torch.randint(1, l_max + 1, (batch,), generator=gen)
    lens[0] = l_max
    rows = torch.randint(0, 1024, (batch, l_max), generator=gen)
    mask = None
    if masked:
        mask = torch.rand(batch, l_max, generator=gen) > 0.5
        mask[:, 0] = True
    return q, k_cache, v_cache, rows, lens, mask


def new_kv_case(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, empty caches, new k and v (strided views of one projection), their slots, rows, lens:
    each sequence reads its own new token in the same call."""
    gen = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, dim = 3, 9, 3, 64
    k_cache = torch.zeros(64, kv_heads, dim, dtype=dtype)
    v_cache = torch.zeros(64, kv_heads, dim, dtype=dtype)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(batch, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(batch, kv_heads, dim)
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    slots = torch.tensor([5, 17, 40])
    rows = torch.tensor([[0, 1, 2, 3, 4, 5], [17, 0, 0, 0, 0, 0], [40, 0, 0, 0, 0, 0]])
    lens = torch.tensor([6, 1, 1])
    return q, k_cache, v_cache, k, v, slots, rows, lens
