"""Weight matmuls `y = x @ W.T + b`, with the fastest kernel available for device, dtype and rows.

CPU, bfloat16: up to GEMV_MAX_ROWS rows (decode of up to 64 sequences) run the kernel of
pie.engine.cpu_kernels, which also folds in the RMSNorm before and the residual add or SwiGLU
after; more rows (prefill) run oneDNN's prepacked weights, ~1.4x faster than `F.linear` there.
CPU, float32 (x86-64 with AVX2): every row count runs pie.engine.cpu_kernels_f32's packed GEMM
with the same fusions; the packed copy is the only copy of the weight, and a GGUF's Q4_1/Q8_0
matrices are packed from their blocks, which the kernel decodes to the very same float32
weights as it reads them (3.6-5.3x fewer bytes; PIE_CPU_BLOCK_WEIGHTS=0 packs float32 instead).
Elsewhere, and wherever the kernels are missing, torch ops with the same meaning: the fused
entry points (`norm=`, `residual=`, `swiglu`) give the same results on every path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pie.engine import cpu_kernels, cpu_kernels_f32
from pie.engine.gguf_tensors import BlockWeight

# CPU float32, rows from which torch's GEMM (MKL) runs a matrix instead of the packed AVX2
# kernel, on CPUs where torch's kernels use AVX-512. Measured on a 2-core AVX-512 Xeon, one
# SmolLM2 layer's four matmuls: 64 rows 5.0 -> 3.3 ms, 256 rows 22.0 -> 12.4, 512 rows 45.6 ->
# 21.7 (2.1x). Fewer rows stay on the kernel: decode reads every weight from memory once a step,
# and the GGUF blocks it decodes are 3.6-5.3x fewer bytes than MKL's float32. The price is a
# float32 copy of each layer matrix ([in, out], ~4 bytes a weight); PIE_CPU_WIDE_GEMM=0 turns it
# off, =1 forces it on.
WIDE_MIN_ROWS = 64


def _wide_gemm_wanted() -> bool:
    forced = os.environ.get("PIE_CPU_WIDE_GEMM")
    if forced is not None:
        return forced != "0"
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


# Rows up to which the fused kernel beats oneDNN (measured on 2-core AVX512-BF16 machines,
# plain matmuls over SmolLM2's weights: 1.25x at 1 row, 1.15x at 32, 1.1x at 64; the fusions
# save ~2 us of torch ops per call on top). Past it (prefill) oneDNN's GEMM is the faster one.
GEMV_MAX_ROWS = cpu_kernels.MAX_ROWS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Variance in float32 and the weight applied after casting back, as HF does, so bf16 runs
    # stay close to the reference: one kernel call where it runs, else as few torch ops as
    # possible (each costs ~1-2 us on CPU).
    lib = cpu_kernels.usable(x) if x.dim() == 2 else None
    if lib is not None:
        return cpu_kernels.rms_norm(lib, x, weight, eps)
    xf = x.float()
    xf = xf * xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    return weight * xf.to(x.dtype)


def _mkldnn_bf16_usable() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


class Linear:
    """A weight matrix [out, in] (+ optional bias [out]) ready to multiply.

    `gated` marks a fused [gate; up] matrix that is used through `swiglu`. `rope_heads` heads of
    `head_dim` outputs first (q and k of a qkv matrix) ask for RoPE folded into the matmul where
    the float32 kernel takes them; `folds_rope` says whether it does, then `rotated` runs it.
    `blocks` (the same matrix as GGUF Q4_1/Q8_0 blocks) is what the float32 kernel packs, where
    it runs and takes them: 3.6-5.3x fewer bytes than float32, with the very same results (the
    blocks decode to the float32 weights bit for bit). For every row count: once each slice of
    blocks is fetched ahead and decoded once for all the rows, they beat the float32 packing at
    1 to 512 rows (measured on a 2-core AVX2 EPYC, SmolLM2's 30 layers of Q4_1 matmuls: 8 rows
    32 -> 22 ms, 32 rows 69 -> 65 ms, 512 rows 947 -> 921 ms), and one packing instead of two
    halves the memory.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        gated: bool = False,
        arena: cpu_kernels.HugePageArena | None = None,  # where the kernel's packed copy goes
        rope_heads: int = 0,
        head_dim: int = 0,
        blocks: BlockWeight | None = None,
    ) -> None:
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size()
        self.bias = bias
        self.packed: torch.Tensor | None = None
        self.weight: torch.Tensor | None = weight
        self.gated = gated
        self.gemv: cpu_kernels.PackedGemv | None = None  # packed for `swiglu` when gated
        self.weight_t: torch.Tensor | None = None  # [in, out] contiguous, CPU float32
        self.f32: cpu_kernels_f32.PackedF32Gemm | None = None  # CPU float32 with AVX2
        self.wide: torch.Tensor | None = None  # [in, out] float32 for MKL at WIDE_MIN_ROWS+ rows
        cpu_f32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        f32_lib = cpu_kernels_f32.load() if cpu_f32 else None
        if f32_lib is not None and not (gated and (bias is not None or self.out_features % 2)):
            if gated or head_dim % 16:
                rope_heads = 0  # the kernel's RoPE layout needs whole panels of pairs
            if blocks is not None and not cpu_kernels_f32.takes_blocks(blocks, weight):
                blocks = None
            self.f32 = cpu_kernels_f32.PackedF32Gemm(
                f32_lib, weight, bias, gated, arena, rope_heads, head_dim, blocks
            )
            self.nbytes = self.f32.packed.numel() * self.f32.packed.element_size()
            if _wide_gemm_wanted():  # `nbytes` stays what a decode step reads
                self.wide = weight.t().contiguous()
            self.weight = None  # the packed copy replaces it (`unpacked` rebuilds it)
            self.bias = self.f32.bias
        elif cpu_f32:
            # Few-row float32 GEMMs stream an [in, out] matrix much faster than torch's
            # [out, in] one on AVX2 CPUs (measured: the 113 MB LM head 13.7 -> 6.5 ms at one
            # row; SmolLM2 decode 104 -> 70 ms/token). `weight` stays a view of the same memory.
            self.weight_t = weight.t().contiguous()
            self.weight = self.weight_t.t()
        elif weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
            lib = cpu_kernels.load()
            if lib is not None and not (gated and (bias is not None or self.out_features % 2)):
                self.gemv = cpu_kernels.PackedGemv(lib, weight, bias, gated, arena)
            if _mkldnn_bf16_usable():
                try:
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
                    self.weight = None  # the packed copy replaces it
                except RuntimeError:  # oneDNN without bf16 support on this CPU: F.linear
                    self.packed = None

    @property
    def folds_rope(self) -> bool:
        return self.f32 is not None and self.f32.rope_cols > 0

    def runs_wide(self, rows: int) -> bool:
        """Whether `rows` float32 rows go to torch's GEMM (no fusions, RoPE not folded in)."""
        return self.wide is not None and rows >= WIDE_MIN_ROWS

    def _wide_mm(self, x: torch.Tensor, norm: torch.Tensor | None, eps: float) -> torch.Tensor:
        assert self.wide is not None
        if norm is not None:
            x = rms_norm(x, norm, eps)
        if self.bias is None:
            return torch.mm(x, self.wide)
        return torch.addmm(self.bias, x, self.wide)

    def rotated(
        self,
        x: torch.Tensor,  # [T, in] float32
        positions: torch.Tensor,  # [T]
        cos: torch.Tensor,  # [max_position, head_dim] tables as pie.engine.model builds them
        sin: torch.Tensor,
        *,
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
    ) -> torch.Tensor:  # [T, out]: x @ W.T + b, its first rope_heads heads rotated by RoPE
        if self.f32 is None or not self.folds_rope:
            raise ValueError("this matrix does not fold RoPE in (check folds_rope)")
        return self.f32.rotated(x, positions, cos, sin, norm, eps)

    def unpacked(self) -> torch.Tensor | None:
        """The weight [out, in] as given, or None where only a bf16 kernel's packing holds it."""
        if self.f32 is not None:
            return self.f32.unpack()
        return self.weight

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.f32 is not None:
            return self.f32(x, cpu_kernels_f32.MODE_PLAIN)
        if self.weight_t is not None:
            if self.bias is None:
                return torch.mm(x, self.weight_t)
            return torch.addmm(self.bias, x, self.weight_t)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)

    def __call__(
        self,
        x: torch.Tensor,  # [T, in]
        *,
        norm: torch.Tensor | None = None,  # [in]: rms_norm(x, norm, eps) first
        eps: float = 0.0,
        residual: torch.Tensor | None = None,  # [T, out]: return residual + x @ W.T
    ) -> torch.Tensor:  # [T, out]
        f32 = self.f32
        if f32 is not None and not self.gated and x.dtype == torch.float32:
            if self.runs_wide(x.shape[0]):
                y = self._wide_mm(x, norm, eps)
                return y if residual is None else y.add_(residual)
            mode = cpu_kernels_f32.MODE_PLAIN if residual is None else cpu_kernels_f32.MODE_ADD
            return f32(x, mode, norm, eps, residual)
        gemv = self.gemv
        if (
            gemv is not None
            and not self.gated
            and x.shape[0] <= GEMV_MAX_ROWS
            and x.dtype == torch.bfloat16
        ):
            mode = cpu_kernels.MODE_PLAIN if residual is None else cpu_kernels.MODE_ADD
            return gemv(x, mode, norm, eps, residual)
        y = self._matmul(x if norm is None else rms_norm(x, norm, eps))
        return y if residual is None else residual + y

    def swiglu(
        self, x: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0
    ) -> torch.Tensor:  # [T, out / 2]: silu(gate) * up of this [gate; up] matrix
        f32 = self.f32
        if f32 is not None and self.gated and x.dtype == torch.float32:
            if self.runs_wide(x.shape[0]):
                gate, up = self._wide_mm(x, norm, eps).chunk(2, dim=-1)
                return F.silu(gate).mul_(up)
            return f32(x, cpu_kernels_f32.MODE_SWIGLU, norm, eps)
        gemv = self.gemv
        if (
            gemv is not None
            and self.gated
            and x.shape[0] <= GEMV_MAX_ROWS
            and x.dtype == torch.bfloat16
        ):
            return gemv(x, cpu_kernels.MODE_SWIGLU, norm, eps)
        gate_up = self._matmul(x if norm is None else rms_norm(x, norm, eps))
        lib = cpu_kernels.usable(gate_up)
        if lib is not None:
            return cpu_kernels.swiglu(lib, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
