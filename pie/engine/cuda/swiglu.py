"""Fused SwiGLU for the CUDA backend: silu(gate) * up of a [gate; up] projection in one pass.

Same roundings as torch's `F.silu(gate).mul_(up)` in the model dtype (and so as HF): silu is
taken in float32 and rounded, then the product is rounded. Torch needs two launches and an
intermediate [T, mlp] tensor; this is one launch that reads [T, 2 mlp] and writes [T, mlp].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 1024  # columns per program


@triton.jit
def _swiglu_kernel(
    x_ptr, out_ptr, stride_xt, stride_ot, n_cols,
    BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + t * stride_xt + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + cols, (act * up).to(dtype), mask=ok)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * mlp] (last dim contiguous) -> silu(gate) * up, [T, mlp]."""
    tokens, width = gate_up.shape
    if width % 2:
        raise ValueError(f"a [gate; up] row has an even width, got {width}")
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    n = width // 2
    out = torch.empty((tokens, n), dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        _swiglu_kernel[(tokens, triton.cdiv(n, BLOCK))](
            gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=BLOCK
        )
    return out


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The torch ops the kernel replaces (test oracle)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
