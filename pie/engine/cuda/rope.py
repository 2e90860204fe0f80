"""Fused RoPE for the CUDA backend: one Triton program rotates every head of one token.

Same maths and roundings as pie.engine.model.apply_rope (HF's rotate-half): with the model's
tables cos [max_pos, D] and sign-folded sin [max_pos, D],
    out = round(round(x * cos[p]) + round(roll(x, D/2) * sin[p]))   (round: to the model dtype)
It replaces two gathers, a roll and three elementwise launches. For Qwen3 the per-head
RMSNorm of q and k can be folded in (`norm_weight`), saving another pass over q and k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pie.engine.cuda.triton_utils import pow2


@triton.jit
def _rope_kernel(
    x_ptr, pos_ptr, cos_ptr, sin_ptr, w_ptr, out_ptr,
    stride_xt, stride_xh, stride_ot, stride_oh, eps,
    HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, DIM)
    rolled = (offs_d + DIM // 2) % DIM  # roll(x, D/2)[d] == x[(d + D/2) % D]
    ok = (offs_h[:, None] < HEADS) & (offs_d[None, :] < DIM)
    base = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh
    x = tl.load(base + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)  # [BLOCK_H, D]
    xr = tl.load(base + rolled[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_NORM:  # Qwen3: RMSNorm of each head first, rounded as rms_norm rounds
        inv = tl.rsqrt(tl.sum(x * x, 1) / DIM + eps)  # [BLOCK_H]; xr has the same sum
        w = tl.load(w_ptr + offs_d).to(tl.float32)
        wr = tl.load(w_ptr + rolled).to(tl.float32)
        x = (w[None, :] * (x * inv[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        xr = (wr[None, :] * (xr * inv[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    p = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + p * DIM + offs_d).to(tl.float32)  # [D]
    s = tl.load(sin_ptr + p * DIM + offs_d).to(tl.float32)
    a = (x * c[None, :]).to(dtype).to(tl.float32)
    b = (xr * s[None, :]).to(dtype).to(tl.float32)
    dst = out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, (a + b).to(dtype), mask=ok)


def rope(
    x: torch.Tensor,  # [T, heads, D], last dim contiguous (a strided view is fine)
    positions: torch.Tensor,  # [T] int
    cos: torch.Tensor,  # [max_pos, D] model dtype, contiguous
    sin: torch.Tensor,  # [max_pos, D], first half negated (rotate_half's sign)
    norm_weight: torch.Tensor | None = None,  # [D]: rms_norm each head before rotating
    eps: float = 0.0,
) -> torch.Tensor:  # [T, heads, D] contiguous
    tokens, heads, dim = x.shape
    if dim != pow2(dim) or dim % 2:
        raise ValueError(f"the fused RoPE kernel needs a power-of-two head dim, got {dim}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        _rope_kernel[(tokens,)](
            x, positions, cos, sin, norm_weight if norm_weight is not None else cos, out,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), eps,
            HEADS=heads, DIM=dim, BLOCK_H=pow2(heads), HAS_NORM=norm_weight is not None,
        )  # fmt: skip
    return out


def rope_reference(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """The torch ops the kernel replaces (fallback and test oracle)."""
    if norm_weight is not None:
        xf = x.float()
        xf = xf * xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        x = norm_weight * xf.to(x.dtype)
    c = cos.index_select(0, positions)[:, None, :]
    s = sin.index_select(0, positions)[:, None, :]
    return x * c + x.roll(x.shape[-1] // 2, -1) * s
