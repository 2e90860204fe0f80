"""Shared helpers for the Triton kernels of the CUDA backend: interpreter detection, block sizes.

Triton's CPU interpreter (TRITON_INTERPRET=1) runs these kernels in CI, but it treats bfloat16
as raw uint16 bits in `tl.dot` and in arithmetic. Kernels therefore compute in float32 after
every load and route matrix products through `mma`, which upcasts only under the interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read at launch, not import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    # float32 operands default to TF32 on tensor cores (10-bit mantissa); the float32 path is the
    # exactness reference, so it asks for IEEE products. Ignored for 16-bit operands.
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, floor: int = 1) -> int:
    """Smallest power of two >= max(n, floor): tl.arange needs power-of-two extents."""
    return max(triton.next_power_of_2(max(n, 1)), floor)


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with a float32 accumulator; UPCAST works around the interpreter's bf16 dot."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out
