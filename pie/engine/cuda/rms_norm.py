"""Fused RMSNorm (+ residual add) for the CUDA backend, one Triton program per row.

Same roundings as HF and pie.engine.linear.rms_norm: the residual sum is rounded to the model
dtype, the variance is taken in float32, the normalised row is rounded to the model dtype
before the weight multiplies it. Torch replaces one launch per op (7 for norm + add) by one.
Rows may be a [T, N] matrix or the heads of a [T, heads, N] view (Qwen3's q/k norm), strided.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pie.engine.cuda.triton_utils import pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    stride_xt, stride_xh, stride_rt, stride_ot, stride_oh, stride_st, eps,
    HEADS: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    t = r // HEADS
    h = r % HEADS
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # x + residual, rounded to the model dtype as torch's add would
        res = tl.load(res_ptr + t * stride_rt + offs, mask=ok, other=0.0).to(tl.float32)
        x = (x + res).to(dtype).to(tl.float32)
        tl.store(sum_ptr + t * stride_st + offs, x.to(dtype), mask=ok)
    inv = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = w * (x * inv).to(dtype).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs, y.to(dtype), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [T, N] or [T, heads, N] (last dim contiguous)."""
    out, _ = _launch(x, None, weight, eps)
    return out


def add_rms_norm(
    x: torch.Tensor,  # [T, N]
    residual: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # rms_norm(x + residual), x + residual
    out, total = _launch(x, residual, weight, eps)
    assert total is not None
    return out, total


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.stride(-1) != 1:
        x = x.contiguous()
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # [T, heads, N]
    tokens, heads, n = x3.shape
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    total = None
    if residual is not None:
        if residual.shape != x.shape or x.dim() != 2:
            raise ValueError(f"residual {list(residual.shape)} must match x {list(x.shape)}, 2-D")
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        total = torch.empty_like(x)
    if tokens * heads:
        _rms_norm_kernel[(tokens * heads,)](
            x3, residual if residual is not None else x3, weight, out,
            total if total is not None else out,
            x3.stride(0), x3.stride(1),
            residual.stride(0) if residual is not None else 0,
            out.stride(0), out.stride(1), total.stride(0) if total is not None else 0,
            eps, HEADS=heads, N=n, BLOCK=pow2(n), HAS_RESIDUAL=residual is not None,
        )  # fmt: skip
    return out.view(x.shape), total


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch ops the kernel replaces (fallback and test oracle): (norm, x + residual)."""
    total = x if residual is None else x + residual
    xf = total.float()
    xf = xf * xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    return weight * xf.to(x.dtype), total
