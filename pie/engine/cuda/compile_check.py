"""Compile every Triton kernel of the CUDA backend for a GPU target, on any machine.

Triton ships ptxas, so the full pipeline (Python AST -> TTIR -> PTX -> cubin) runs without a
GPU: this catches what the CPU interpreter cannot (non-constexpr globals, dot shapes, type
errors in compiled code) and reports registers and spills per variant.

    python -m pie.engine.cuda.compile_check [--arch 90] [--shape 32,8,128,4096 ...]

A shape is heads,kv_heads,head_dim,hidden; several compile in one process (one Triton import).

Run it in a process without TRITON_INTERPRET=1: under the interpreter `@triton.jit` yields
functions that cannot be compiled.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pie.engine.cuda import paged_attention, rms_norm, rope, swiglu
from pie.engine.cuda.metadata import KernelConfig
from pie.engine.cuda.triton_utils import pow2

_FLOAT_ARGS = {"scale_log2", "eps"}


@dataclass(frozen=True, slots=True)
class Compiled:
    kernel: str
    variant: str
    registers: int
    spill_bytes: int
    shared_bytes: int


def compile_kernel(
    kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any], arch: int, num_warps: int
) -> Compiled:
    """One kernel variant to a cubin; argument types follow their names (`*_ptr`: pointers,
    `scale_log2`/`eps`: float32, the rest int32)."""
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("kernels were built by Triton's interpreter: unset TRITON_INTERPRET")
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*i32")
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    # torch allocations are 16-byte aligned, which Triton specialises on at launch
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(kernel.arg_names)
        if n.endswith("_ptr")
    }
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    binary = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )
    registers, spill = _resource_usage(binary.asm["cubin"])
    variant = ",".join(
        f"{k}={v}" for k, v in constexprs.items() if k not in ("UPCAST", "PRECISION")
    )
    return Compiled(kernel.__name__, variant, registers, spill, int(binary.metadata.shared))


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    reg, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return int(reg.group(1)) if reg else -1, int(stack.group(1)) if stack else -1


def compile_all(
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    page_size: int = 16,
    hidden: int = 4096,
    arch: int = 90,
    config: KernelConfig | None = None,
) -> list[Compiled]:
    """Every variant the backend launches for this shape in bfloat16, as TritonAttention and
    FusedLlamaModel (norm, RoPE, SwiGLU) would launch them."""
    cfg = config or KernelConfig()
    group = heads // kv_heads
    bf = "*bf16"
    attn_ptrs = {"q_ptr": bf, "k_cache_ptr": bf, "v_cache_ptr": bf, "out_ptr": bf}
    attn_ptrs |= {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "mask_ptr": "*u8"}
    shape = {"KV_HEADS": kv_heads, "GROUP": group, "HEAD_DIM": head_dim, "PAGE_SIZE": page_size}
    exact = {"UPCAST": False, "PRECISION": "tf32"}
    out = [
        compile_kernel(
            paged_attention._store_kv_kernel,
            {"k_ptr": bf, "v_ptr": bf, "k_cache_ptr": bf, "v_cache_ptr": bf},
            {
                "KV_HEADS": kv_heads,
                "HEAD_DIM": head_dim,
                "BLOCK_H": pow2(kv_heads),
                "BLOCK_D": pow2(head_dim),
            },
            arch,
            4,
        )
    ]
    for split in (False, True):
        for mask in (False, True):
            flags = {
                "BLOCK_H": pow2(group, 16),
                "BLOCK_D": pow2(head_dim, 16),
                "BLOCK_N": cfg.block_n,
            }
            flags |= {"SPLIT_K": split, "HAS_MASK": mask}
            out.append(
                compile_kernel(
                    paged_attention._decode_kernel,
                    attn_ptrs,
                    shape | flags | exact,
                    arch,
                    cfg.decode_warps,
                )
            )
    out.append(
        compile_kernel(
            paged_attention._reduce_kernel,
            {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": bf},
            {"HEADS": heads, "HEAD_DIM": head_dim, "BLOCK_S": 16, "BLOCK_D": pow2(head_dim)},
            arch,
            4,
        )
    )
    for mask in (False, True):
        flags = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": pow2(head_dim, 16)}
        flags |= {"HAS_MASK": mask}
        out.append(
            compile_kernel(
                paged_attention._prefill_kernel,
                attn_ptrs,
                shape | flags | exact,
                arch,
                cfg.prefill_warps,
            )
        )
    norm_ptrs = {"x_ptr": bf, "res_ptr": bf, "w_ptr": bf, "out_ptr": bf, "sum_ptr": bf}
    for rows, n, residual in ((1, hidden, True), (1, hidden, False)):
        consts = {"HEADS": rows, "N": n, "BLOCK": pow2(n), "HAS_RESIDUAL": residual}
        out.append(compile_kernel(rms_norm._rms_norm_kernel, norm_ptrs, consts, arch, 4))
    rope_ptrs = {
        "x_ptr": bf,
        "pos_ptr": "*i64",
        "cos_ptr": bf,
        "sin_ptr": bf,
        "w_ptr": bf,
        "out_ptr": bf,
    }
    for rows, norm in ((heads + kv_heads, False), (heads, True), (kv_heads, True)):
        consts = {"HEADS": rows, "DIM": head_dim, "BLOCK_H": pow2(rows), "HAS_NORM": norm}
        out.append(compile_kernel(rope._rope_kernel, rope_ptrs, consts, arch, 4))
    out.append(
        compile_kernel(
            swiglu._swiglu_kernel, {"x_ptr": bf, "out_ptr": bf}, {"BLOCK": swiglu.BLOCK}, arch, 4
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        help="heads,kv_heads,head_dim,hidden (repeatable; default 32,8,128,4096: Llama 8B)",
    )
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape or ["32,8,128,4096"]]
    results = []
    for shape in shapes:
        if len(shape) != 4:
            parser.error(f"--shape takes heads,kv_heads,head_dim,hidden; got {shape}")
        heads, kv_heads, head_dim, hidden = shape
        results += compile_all(heads, kv_heads, head_dim, hidden=hidden, arch=args.arch)
    for r in results:
        print(
            f"{r.kernel:18s} regs={r.registers:3d} spill={r.spill_bytes:5d} shared={r.shared_bytes:6d}  {r.variant}"
        )
    spilled = [r for r in results if r.spill_bytes > 0]
    print(f"compiled {len(results)} variants for sm_{args.arch}; {len(spilled)} spill registers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
