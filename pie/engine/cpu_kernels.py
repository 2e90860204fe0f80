"""bf16 CPU kernels for decode: C (pie/engine/csrc/cpu_kernels.c) built on first use and cached.

Decoding a few sequences reads every weight once per token, so its speed is the speed of
streaming weights. oneDNN's bf16 inner product pays ~10 us a call and streams ~32 GB/s on this
project's 2-core machines; `PackedGemv` pays ~3 us, streams ~45 GB/s, and folds the RMSNorm
before a matmul and the residual add or SwiGLU after it into the same pass. `decode_attention`
attends one new token per sequence straight from the paged KV cache, where torch ops need a
dozen calls and gathered copies. `load()` returns None where the kernels cannot run (not x86-64
with AVX512-BF16, no C compiler, or PIE_CPU_KERNELS=0): callers then use torch ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CSRC = Path(__file__).with_name("csrc")  # C sources, shipped as package data
SOURCE = (CSRC / "cpu_kernels.c").read_text()

MAX_ROWS = 64  # rows (tokens) one PackedGemv call takes
MODE_PLAIN, MODE_ADD, MODE_SWIGLU = 0, 1, 2
BLOCK = 64  # outputs per packed weight block (fixed by the C kernel)
ATTENTION_HEAD_DIMS = (64, 128)  # head sizes decode_attention is compiled for

_FLAGS = [
    "-O3",
    "-shared",
    "-fPIC",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-fopenmp",  # binds to the libgomp torch already loaded: one thread pool, not two
    f"-DPIE_MAX_ROWS={MAX_ROWS}",
]

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class _PackedWeight(ctypes.Structure):
    _fields_ = [
        ("w", _P),
        ("bias", _P),
        ("n_blocks", _I64),
        ("k_pairs", _I64),
        ("k", _I64),
        ("n_out", _I64),
        ("mode", _I32),
    ]


# Argument types shared by the bf16 kernels here and the float32 ones (cpu_kernels_f32), whose
# entry points take the same arguments in their own dtype.
# after the packed weight: x, x_stride, rows, norm_w, eps, residual, res_stride, y, y_stride, threads
GEMM_ARGS: list[type] = [_P, _I64, _I64, _P, _F32, _P, _I64, _P, _I64, _I32]
# q, q_stride_b, q_stride_h, k_cache, v_cache, kv_rows, kv_lens, mask, batch, heads, kv_heads,
# dim, l_max, scale, out, k_new, k_new_stride, v_new, v_new_stride, slot_rows, threads
DECODE_ATTENTION_ARGS: list[type] = [_P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64,
                                     _I64, _F32, _P, _P, _I64, _P, _I64, _P, _I32]  # fmt: skip
# x, x_stride, tokens, heads, dim, positions, cos, sin, y, threads
ROPE_ARGS: list[type] = [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _I32]

_SIGNATURES: dict[str, list[type]] = {
    "pie_gemv": [ctypes.POINTER(_PackedWeight), *GEMM_ARGS],
    "pie_decode_attention": DECODE_ATTENTION_ARGS,
    # x, x_stride, rows, k, w, eps, y, y_stride, threads
    "pie_rms_norm": [_P, _I64, _I64, _I64, _P, _F32, _P, _I64, _I32],
    # gu, gu_stride, rows, half, y, y_stride, threads
    "pie_swiglu": [_P, _I64, _I64, _I64, _P, _I64, _I32],
    "pie_rope": ROPE_ARGS,
}  # fmt: skip


def _cpu_has_avx512_bf16() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx512_bf16", "avx512bw", "avx512vl"))


def _cache_dir() -> Path:
    """$PIE_CACHE_DIR/kernels, else ~/.cache/pie/kernels (the runtime caches beside it)."""
    root = os.environ.get("PIE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "pie")
    return Path(root) / "kernels"


def build(compiler: str, source: str = SOURCE, flags: Sequence[str] = tuple(_FLAGS)) -> Path:
    """Compile `source` once per (source, compiler, flags); ~0.5 s, then a cache hit."""
    key = hashlib.sha256("\0".join([source, compiler, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu-kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
        src.write_text(source)
        cmd = [compiler, *flags, str(src), "-o", str(out), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(out, target)  # atomic: a concurrent builder sees a whole file or none
    return target


def compile_and_load(
    source: str, flags: Sequence[str], signatures: dict[str, list[type]]
) -> ctypes.CDLL | None:
    """Build `source` (cached) with the C compiler ($CC, else cc or gcc) and load it with
    `signatures` set; None where there is no compiler or the build or load fails."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler, source, flags)))
    except (OSError, subprocess.SubprocessError):
        return None
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built or run here."""
    if os.environ.get("PIE_CPU_KERNELS", "1") == "0" or not _cpu_has_avx512_bf16():
        return None
    return compile_and_load(SOURCE, _FLAGS, _SIGNATURES)


def usable(x: torch.Tensor) -> ctypes.CDLL | None:
    """The kernel library if it loads here and `x` is a bf16 CPU tensor with contiguous rows."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.stride(-1) != 1:
        return None
    return load()


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with code {rc}; set PIE_CPU_KERNELS=0 to use torch ops")


# ---- weight matmuls ------------------------------------------------------------------------------
def huge_page_zeros(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor in memory mapped fresh from the OS, advised into 2 MiB pages.

    Decode streams every weight and every sequence's KV pages each step; with 4 KiB pages the
    TLB misses every 4 KiB and the hardware prefetcher stops at every boundary (measured: ~5%
    of the weights' bandwidth; a plain read of the KV pages 15 -> 19 GB/s). An anonymous
    mapping is zero by definition, so nothing is written up front: a page costs only when first
    used (a 755 MB KV cache took 0.8 s to zero at start, most of which a short run never
    touches). Where madvise is missing the pages stay 4 KiB.
    """
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * dtype.itemsize
    huge = 2 << 20
    # Private: a shared anonymous mapping is shmem, which transparent huge pages skip.
    region = mmap.mmap(-1, nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    start = -view.data_ptr() % huge
    if nbytes and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # no transparent huge pages here: plain pages
            region.madvise(mmap.MADV_HUGEPAGE, start, (nbytes + 4095) // 4096 * 4096)
    return view[start : start + nbytes].view(dtype).view(tuple(shape))


class HugePageArena:
    """Memory for packed weights in 2 MiB pages (`huge_page_zeros` chunks), handed out in call
    order."""

    _CHUNK = 64 << 20  # bytes per chunk, at least

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None
        self._at = 0

    def take(self, numel: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """A fresh buffer of `numel` elements of `dtype` (zeros), 64-byte aligned."""
        nbytes = -(-numel * dtype.itemsize // 64) * 64
        if self._chunk is None or self._at + nbytes > self._chunk.numel():
            self._chunk = huge_page_zeros((max(nbytes, self._CHUNK),), torch.uint8)
            self._at = 0
        out = self._chunk[self._at : self._at + nbytes]
        self._at += nbytes
        return out.view(dtype)[:numel]


def _packed_numel(n: int, k: int) -> int:
    return -(-n // BLOCK) * BLOCK * (-(-k // 2) * 2)


def _pack_into(weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """[N, K] -> out viewed [ceil(N/64), ceil(K/2), 64, 2], zero-padded: what pie_gemv streams."""
    n, k = weight.shape
    blocks, pairs = -(-n // BLOCK), -(-k // 2)
    if n % BLOCK or k % 2:
        padded = weight.new_zeros(blocks * BLOCK, pairs * 2)
        padded[:n, :k] = weight
        weight = padded
    packed = out[: _packed_numel(n, k)].view(blocks, pairs, BLOCK, 2)
    packed.copy_(weight.view(blocks, BLOCK, pairs, 2).permute(0, 2, 1, 3))  # one pass
    return packed


class PackedGemv:
    """One bf16 weight [N, K] (+ bias [N]) packed for pie_gemv.

    `gated` takes a [gate; up] matrix (N = 2I) and computes silu(x @ gate.T) * (x @ up.T).
    """

    def __init__(
        self,
        lib: ctypes.CDLL,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gated: bool,
        arena: HugePageArena | None = None,
    ) -> None:
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise ValueError("PackedGemv takes a bfloat16 CPU weight")
        if gated and (bias is not None or weight.shape[0] % 2):
            raise ValueError("a gated PackedGemv takes an even number of rows and no bias")
        n, k = weight.shape
        self._fn = lib.pie_gemv
        # gated: pack the halves apart, so that gate block j and up block j hold the same outputs
        halves = [weight[: n // 2], weight[n // 2 :]] if gated else [weight]
        self.n_out = halves[0].shape[0]
        size = _packed_numel(self.n_out, k)
        buffer = (
            arena.take(size * len(halves))
            if arena is not None
            else torch.empty(size * len(halves), dtype=torch.bfloat16)
        )
        parts = [_pack_into(h, buffer[i * size : (i + 1) * size]) for i, h in enumerate(halves)]
        self.packed = buffer[: size * len(halves)].view(
            -1, *parts[0].shape[1:]
        )  # [blocks, pairs, 64, 2]
        self.bias = None if bias is None else bias.to(torch.bfloat16).contiguous()
        modes = (MODE_SWIGLU,) if gated else (MODE_PLAIN, MODE_ADD)
        self._specs = {
            mode: _PackedWeight(
                self.packed.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(),
                self.packed.shape[0],
                self.packed.shape[1],
                k,
                self.n_out,
                mode,
            )
            for mode in modes
        }
        self._refs = {mode: ctypes.byref(spec) for mode, spec in self._specs.items()}

    def __call__(
        self,
        x: torch.Tensor,  # [M, K] bf16, M <= MAX_ROWS
        mode: int,
        norm: torch.Tensor | None = None,  # [K] bf16 RMSNorm weight: x is normalized first
        eps: float = 0.0,
        residual: torch.Tensor | None = None,  # [M, N] bf16, for MODE_ADD
    ) -> torch.Tensor:  # [M, n_out] bf16
        y = torch.empty((x.shape[0], self.n_out), dtype=torch.bfloat16)
        return call_gemm(
            self._fn,
            self._refs[mode],
            x,
            norm,
            eps,
            residual,
            y,
            f"pie_gemv (at most {MAX_ROWS} rows)",
        )


def call_gemm(
    fn: Any,  # a C weight matmul: pie_gemv's arguments
    weight: Any,  # ctypes reference to the packed weight's spec
    x: torch.Tensor,  # [M, K] in the kernel's dtype
    norm: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,  # [M, N]
    y: torch.Tensor,  # [M, N'] output, contiguous
    what: str,
) -> torch.Tensor:
    """Lays out a packed matmul's arguments for `fn` (shared by the bf16 and float32 kernels)."""
    rows = x.shape[0]
    if rows == 0:  # a forward that asks for no outputs reaches the LM head with no rows
        return y
    if x.stride(-1) != 1:
        x = x.contiguous()
    res_ptr, res_stride = None, 0
    if residual is not None:
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        res_ptr, res_stride = residual.data_ptr(), residual.stride(0)
    rc = fn(
        weight,
        x.data_ptr(),
        x.stride(0),
        rows,
        None if norm is None else norm.data_ptr(),
        eps,
        res_ptr,
        res_stride,
        y.data_ptr(),
        y.stride(0),
        torch.get_num_threads(),
    )
    check(rc, f"{what} on {rows} rows")
    return y


# ---- attention -------------------------------------------------------------------------------------
def decode_attention_supported(heads: int, kv_heads: int, dim: int) -> bool:
    """Whether decode_attention takes these shapes here (and the library loads)."""
    return dim in ATTENTION_HEAD_DIMS and heads % kv_heads == 0 and load() is not None


def decode_attention(
    q: torch.Tensor,  # [B, H, D] bf16, last dim contiguous
    k_cache: torch.Tensor,  # [rows, KH, D] bf16, contiguous
    v_cache: torch.Tensor,
    kv_rows: torch.Tensor,  # [B, Lmax] int64: cache row of each slot
    kv_lens: torch.Tensor,  # [B] int64: slots each sequence reads
    mask: torch.Tensor | None,  # [B, Lmax] bool (True = attend), or None for all
    scale: float,
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # [B, H, D] bf16
    """One-token-per-sequence attention straight from the paged cache, float32 inside.

    `new` = (k [B, KH, D], v [B, KH, D], slot_rows [B]): written to the cache first.
    """
    lib = load()
    assert lib is not None, "decode_attention needs the kernel library"
    return call_decode_attention(
        lib.pie_decode_attention, torch.bfloat16, q, k_cache, v_cache, kv_rows, kv_lens, mask,
        scale, new,
    )  # fmt: skip


def call_decode_attention(
    fn: Any,  # a C decode attention: pie_decode_attention's arguments
    dtype: torch.dtype,  # of q, the caches and the output
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_rows: torch.Tensor,
    kv_lens: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Lays out decode_attention's arguments for `fn` (shared by the bf16 and float32 kernels)."""
    batch, heads, dim = q.shape
    if (
        k_cache.shape != v_cache.shape
        or k_cache.shape[2] != dim
        or kv_rows.shape[0] != batch
        or kv_lens.shape != (batch,)
        or (mask is not None and mask.shape != kv_rows.shape)
        or any(t.dtype != dtype for t in (q, k_cache, v_cache))
        or kv_rows.dtype != torch.int64
        or kv_lens.dtype != torch.int64
        or (mask is not None and mask.dtype != torch.bool)
    ):
        raise ValueError(
            f"decode attention: q {list(q.shape)}, caches {list(k_cache.shape)}, rows "
            f"{list(kv_rows.shape)}, lens {list(kv_lens.shape)} do not fit together (or are not "
            f"{dtype}, int64 rows and lens, a bool mask)"
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    k_ptr = v_ptr = slots_ptr = None
    k_stride = v_stride = 0
    if new is not None:
        k, v, slot_rows = new
        if k.stride(-1) != 1 or k.stride(-2) != dim:  # rows of [KH, D] must be contiguous
            k = k.contiguous()
        if v.stride(-1) != 1 or v.stride(-2) != dim:
            v = v.contiguous()
        k_ptr, k_stride, v_ptr, v_stride = k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0)
        slots_ptr = slot_rows.data_ptr()
    out = torch.empty((batch, heads, dim), dtype=dtype)
    rc = fn(
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        kv_rows.data_ptr(),
        kv_lens.data_ptr(),
        None if mask is None else mask.data_ptr(),
        batch,
        heads,
        k_cache.shape[1],
        dim,
        kv_rows.shape[1],
        scale,
        out.data_ptr(),
        k_ptr,
        k_stride,
        v_ptr,
        v_stride,
        slots_ptr,
        torch.get_num_threads(),
    )
    check(rc, f"decode attention on q {list(q.shape)}")
    return out


# ---- elementwise ---------------------------------------------------------------------------------
def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of the rows of x [M, K] (bf16, rows contiguous)."""
    rows, k = x.shape
    y = torch.empty((rows, k), dtype=torch.bfloat16)
    w = weight.contiguous()
    threads = torch.get_num_threads()
    rc = lib.pie_rms_norm(
        x.data_ptr(), x.stride(0), rows, k, w.data_ptr(), eps, y.data_ptr(), k, threads
    )
    check(rc, "pie_rms_norm")
    return y


def swiglu(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows [gate | up] of gate_up [M, 2I] (bf16) -> [M, I]."""
    rows, width = gate_up.shape
    half = width // 2
    y = torch.empty((rows, half), dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    rc = lib.pie_swiglu(
        gate_up.data_ptr(), gate_up.stride(0), rows, half, y.data_ptr(), half, threads
    )
    check(rc, "pie_swiglu")
    return y


def rope(
    lib: ctypes.CDLL,
    x: torch.Tensor,  # [T, heads, D] bf16, heads D apart, rows any distance apart
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor,  # [max_position, D] bf16 table
    sin: torch.Tensor,  # [max_position, D] bf16 table, first half negated
) -> torch.Tensor | None:  # [T, heads, D] contiguous, or None where the kernel does not take x
    if x.shape[2] % 32:
        return None
    return call_rope(lib.pie_rope, torch.bfloat16, x, positions, cos, sin)


def call_rope(
    fn: Any,  # a C RoPE: pie_rope's arguments
    dtype: torch.dtype,  # of x, the tables and the output
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor | None:
    """Lays out rope's arguments for `fn` (shared by the bf16 and float32 kernels); None where
    the kernel does not take x (heads not D apart, D not contiguous)."""
    tokens, heads, dim = x.shape
    if x.stride(1) != dim or x.stride(2) != 1 or not positions.is_contiguous():
        return None
    y = torch.empty((tokens, heads, dim), dtype=dtype)
    rc = fn(
        x.data_ptr(),
        x.stride(0),
        tokens,
        heads,
        dim,
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    check(rc, "rope")
    return y
