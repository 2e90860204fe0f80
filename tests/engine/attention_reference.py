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
