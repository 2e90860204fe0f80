"""Float32 CPU kernels for x86-64 with AVX2 and FMA, compiled on first use.

The float32 counterpart of pie.engine.cpu_kernels (which needs AVX512-BF16): the engine's
default CPU dtype is float32 wherever bf16 has no hardware support, and there torch spends most
of a decode step in one- to few-row float32 GEMMs that stream weights at well under half the
memory's speed, plus ~40 small ops per layer. `PackedF32Gemm` multiplies any number of rows by
a weight packed into 16-output panels (one sequential stream per thread) and folds the RMSNorm
before and the residual add or SwiGLU after into the same call; a GGUF matrix in Q4_1 or Q8_0
blocks is packed from its blocks and dequantized as it is read (the same float32 weights, 3.6-5.3x
fewer bytes to stream); `decode_attention` attends one
new token per sequence straight from the paged KV cache; `rope` rotates q and k in one pass.
`load()` returns None where the kernels cannot run (not x86-64 with AVX2 and FMA, no C
compiler, or PIE_CPU_KERNELS=0): callers then use torch ops.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as QType

from pie.engine import cpu_kernels
from pie.engine.gguf_tensors import BlockWeight

SOURCE = (cpu_kernels.CSRC / "cpu_kernels_f32.c").read_text()
PANEL = 16  # outputs per packed weight panel (fixed by the C kernel)
MODE_PLAIN, MODE_ADD, MODE_SWIGLU = 0, 1, 2  # as in pie.engine.cpu_kernels
_MODE_GATED_PLAIN = 3  # what MODE_PLAIN runs on a gated matrix: [x @ gate.T | x @ up.T]

# -ffp-contract=off: no fused multiply-adds the source does not ask for, so RoPE and the
# epilogues round exactly as torch's separate float32 ops do.
_FLAGS = ("-O3", "-shared", "-fPIC", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp")

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


class _PackedF32(ctypes.Structure):
    _fields_ = [
        ("w", _P),
        ("bias", _P),
        ("panels", _I64),
        ("k", _I64),
        ("n_out", _I64),
        ("mode", _I32),
        ("rope_cols", _I64),
        ("head_dim", _I64),
        ("qtype", _I32),
    ]


class _DecodeLayer(ctypes.Structure):  # DecodeLayerF32
    _fields_ = [
        (name, _P)
        for name in ("qkv", "o", "gate_up", "down", "attn_norm", "mlp_norm", "k_cache", "v_cache")
    ]


# block type -> (the C kernel's QTYPE_, bytes of a panel's record for 32 inputs)
_QTYPES = {QType.Q4_1: (1, 384), QType.Q8_0: (2, 576)}
_QBLOCK = 32  # inputs per quantized block


# layers, n_layers, x, batch, hidden, mlp, eps, positions, cos, sin, kv_rows, kv_lens, mask,
# l_max, slot_rows, heads, kv_heads, dim, scale, qkv, attn, h, threads
_DECODE_LAYERS_ARGS: list[type] = [_P, _I64, _P, _I64, _I64, _I64, ctypes.c_float, _P, _P, _P,
                                   _P, _P, _P, _I64, _P, _I64, _I64, _I64, ctypes.c_float, _P,
                                   _P, _P, _I32]  # fmt: skip
# x, x_stride, rows, norm_w, eps, positions, cos, sin, y, y_stride, threads
_GEMM_ROPE_ARGS: list[type] = [_P, _I64, _I64, _P, ctypes.c_float, _P, _P, _P, _P, _I64, _I32]

_SIGNATURES: dict[str, list[type]] = {  # as the bf16 kernels take them (gemm_rope: float32 only)
    "pie_f32_gemm": [ctypes.POINTER(_PackedF32), *cpu_kernels.GEMM_ARGS],
    "pie_f32_gemm_rope": [ctypes.POINTER(_PackedF32), *_GEMM_ROPE_ARGS],
    "pie_f32_decode_attention": cpu_kernels.DECODE_ATTENTION_ARGS,
    "pie_f32_rope": cpu_kernels.ROPE_ARGS,
    "pie_f32_decode_layers": _DECODE_LAYERS_ARGS,
}


def _cpu_has_avx2_fma() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built or run here."""
    if os.environ.get("PIE_CPU_KERNELS", "1") == "0" or not _cpu_has_avx2_fma():
        return None
    return cpu_kernels.compile_and_load(SOURCE, _FLAGS, _SIGNATURES)


def usable(x: torch.Tensor) -> ctypes.CDLL | None:
    """The kernel library if it loads here and `x` is a float32 CPU tensor with contiguous rows."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(-1) != 1:
        return None
    return load()


def _rows_ready(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows are contiguous float32 (any row stride), else a copy that is."""
    return x if x.stride(-1) == 1 and x.dtype == torch.float32 else x.float().contiguous()


# ---- weight matmuls ------------------------------------------------------------------------------
def _pack(weight: torch.Tensor, parts: int, out: torch.Tensor) -> None:
    """[parts * n, K] -> out viewed [ceil(n/16), parts, K, 16], zero-padded: panel j of every
    part side by side, each [K, 16] (outputs of the panel adjacent), as pie_f32_gemm streams."""
    n, k = weight.shape[0] // parts, weight.shape[1]
    panels = -(-n // PANEL)
    stacked = weight.reshape(parts, n, k)
    if n % PANEL:
        padded = weight.new_zeros(parts, panels * PANEL, k)
        padded[:, :n] = stacked
        stacked = padded
    out.view(panels, parts, k, PANEL).copy_(
        stacked.view(parts, panels, PANEL, k).permute(1, 0, 3, 2)
    )


def _pack_blocks(blocks: BlockWeight, parts: int, out: torch.Tensor) -> None:
    """[parts * n, K] in blocks -> out (uint8) viewed [ceil(n/16), parts, K/32, record]: each
    panel's records, laid out as pie_f32_gemm decodes them (see QTYPE_ in the C source)."""
    d, m, q = blocks.split()  # [parts * n, K/32], the same or None, [parts * n, K/32, 32]
    n, nb = d.shape[0] // parts, d.shape[1]
    panels = -(-n // PANEL)

    def grid(
        t: torch.Tensor,
    ) -> torch.Tensor:  # [parts * n, nb, ...] -> [panels, parts, nb, ..., 16]
        t = t.reshape(parts, n, *t.shape[1:])
        if n % PANEL:  # zero scales and values: the padding outputs are 0
            padded = t.new_zeros(parts, panels * PANEL, *t.shape[2:])
            padded[:, :n] = t
            t = padded
        t = t.view(parts, panels, PANEL, *t.shape[2:]).transpose(0, 1)
        return t.movedim(2, -1).contiguous()

    fields = [grid(d).view(torch.uint8)]  # float32 scales as their bytes: [.., nb, 64]
    if m is not None:
        fields.append(grid(m).view(torch.uint8))
    values = grid(q)  # [panels, parts, nb, 32, 16]
    if blocks.qtype == QType.Q4_1:  # outputs j and j + 8 share byte j
        values = values[..., :8] | (values[..., 8:] << 4)
    record = _QTYPES[blocks.qtype][1]
    packed = torch.cat([*fields, values.view(torch.uint8).flatten(-2)], dim=-1)
    out.view(panels, parts, nb, record).copy_(packed)


def _unpack_blocks(qtype: QType, packed: torch.Tensor, parts: int, k: int) -> torch.Tensor:
    """The float32 weights of `_pack_blocks`'s records, [parts, panels * 16, k], with the
    operations of the float32 dequantization (bit-identical to it)."""
    record = _QTYPES[qtype][1]
    nb = k // _QBLOCK
    grid = packed.view(-1, parts, nb, record)
    d = grid[..., : 4 * PANEL].contiguous().view(torch.float32)[..., None, :]  # [.., nb, 1, 16]
    if qtype == QType.Q4_1:
        m = grid[..., 4 * PANEL : 8 * PANEL].contiguous().view(torch.float32)[..., None, :]
        byte = grid[..., 8 * PANEL :].reshape(*grid.shape[:3], _QBLOCK, 8)
        q = torch.cat([byte & 0x0F, byte >> 4], dim=-1).float()  # [.., nb, 32, 16]
        w = d * q + m
    else:
        q = (
            grid[..., 4 * PANEL :]
            .contiguous()
            .view(torch.int8)
            .view(*grid.shape[:3], _QBLOCK, PANEL)
        )
        w = q.float() * d
    # [panels, parts, nb, 32, 16] -> [parts, panels, 16, nb, 32]
    return w.permute(1, 0, 4, 2, 3).reshape(parts, -1, k)


def streams_blocks() -> bool:
    """Whether the kernels run here and may read GGUF blocks (PIE_CPU_BLOCK_WEIGHTS=0: never,
    the float32 weights are packed instead)."""
    return os.environ.get("PIE_CPU_BLOCK_WEIGHTS", "1") != "0" and load() is not None


def takes_blocks(blocks: BlockWeight, weight: torch.Tensor) -> bool:
    """Whether PackedF32Gemm packs `weight` from `blocks` here."""
    return streams_blocks() and _blocks_fit(blocks, weight)


def _blocks_fit(blocks: BlockWeight, weight: torch.Tensor) -> bool:
    """Whether `blocks` hold `weight` in a block type the kernel decodes."""
    return blocks.qtype in _QTYPES and blocks.shape == tuple(weight.shape)


def _rope_order(n: int, rope_cols: int, head_dim: int) -> torch.Tensor:
    """The weight rows in packing order for pie_f32_gemm's RoPE layout: in each head of the
    first rope_cols outputs, 8 rows of the first half, then their 8 partners of the second
    half, and so on (a panel of 16 holds both halves of RoPE's pairs); later rows unchanged."""
    heads, half = rope_cols // head_dim, head_dim // 2
    order = torch.arange(n)
    order[:rope_cols] = order[:rope_cols].view(heads, 2, half // 8, 8).transpose(1, 2).flatten()
    return order


class PackedF32Gemm:
    """One float32 weight [N, K] (+ bias [N]) packed for pie_f32_gemm.

    `gated` takes a [gate; up] matrix (N = 2I) and computes silu(x @ gate.T) * (x @ up.T): gate
    panel j and up panel j are stored side by side, so one thread reads both.
    `rope_heads` > 0 marks the first rope_heads * head_dim outputs as the q and k heads of a qkv
    matrix: `rotated` then applies RoPE to them as the matmul's sums are written (head_dim a
    multiple of 16). The layout changes nothing else: `__call__` gives the same results.
    `blocks`, the same matrix as a GGUF's Q4_1 or Q8_0 blocks (`weight` their dequantization),
    packs the blocks instead: the kernel decodes them to the very same float32 weights.
    """

    def __init__(
        self,
        lib: ctypes.CDLL,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gated: bool,
        arena: cpu_kernels.HugePageArena | None = None,
        rope_heads: int = 0,
        head_dim: int = 0,
        blocks: BlockWeight | None = None,
    ) -> None:
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError("PackedF32Gemm takes a 2-D float32 CPU weight")
        if blocks is not None and not _blocks_fit(blocks, weight):
            raise ValueError(
                f"blocks {blocks.qtype.name} {list(blocks.shape)} do not hold this "
                f"{list(weight.shape)} weight as Q4_1 or Q8_0"
            )
        if gated and (bias is not None or weight.shape[0] % 2):
            raise ValueError("a gated PackedF32Gemm takes an even number of rows and no bias")
        n, k = weight.shape
        self.rope_cols, self.head_dim = rope_heads * head_dim, head_dim
        if self.rope_cols and (gated or head_dim % 16 or self.rope_cols > n):
            raise ValueError(
                f"a RoPE layout takes a plain matrix, head_dim a multiple of 16 and at most its "
                f"{n} outputs (got {rope_heads} heads of {head_dim})"
            )
        self._order = _rope_order(n, self.rope_cols, head_dim) if self.rope_cols else None
        if self._order is not None:
            weight = weight.index_select(0, self._order)
            blocks = None if blocks is None else blocks.rows(self._order)
        self._fn = lib.pie_f32_gemm
        self._rope_fn = lib.pie_f32_gemm_rope
        self.in_features = k
        self.n_out = n // 2 if gated else n
        panels = -(-self.n_out // PANEL)
        parts = 2 if gated else 1
        self.qtype = None if blocks is None else blocks.qtype
        if blocks is None:
            size, dtype = panels * parts * k * PANEL, torch.float32
        else:
            size, dtype = panels * parts * (k // _QBLOCK) * _QTYPES[blocks.qtype][1], torch.uint8
        buffer = arena.take(size, dtype) if arena is not None else torch.empty(size, dtype=dtype)
        if blocks is None:
            _pack(weight, parts, buffer)
        else:
            _pack_blocks(blocks, parts, buffer)
        self._parts = parts
        self.packed = buffer
        self.bias = None if bias is None else bias.float().contiguous()
        self.gated = gated
        modes = (MODE_SWIGLU, _MODE_GATED_PLAIN) if gated else (MODE_PLAIN, MODE_ADD)
        self._specs = {
            mode: _PackedF32(
                buffer.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(),
                panels * parts,
                k,
                self.n_out,
                mode,
                self.rope_cols,
                head_dim,
                0 if blocks is None else _QTYPES[blocks.qtype][0],
            )
            for mode in modes
        }
        self._refs = {mode: ctypes.byref(spec) for mode, spec in self._specs.items()}

    def unpack(self) -> torch.Tensor:
        """The weight [N, K] this was packed from (a new tensor)."""
        k = self.in_features
        if self.qtype is not None:
            grid = _unpack_blocks(self.qtype, self.packed, self._parts, k)
        else:
            panels = self.packed.numel() // (self._parts * k * PANEL)
            grid = self.packed.view(panels, self._parts, k, PANEL).permute(1, 0, 3, 2)
            grid = grid.reshape(self._parts, panels * PANEL, k)
        weight = grid[:, : self.n_out].reshape(-1, k)
        if self._order is None:
            return weight
        return torch.empty_like(weight).index_copy_(0, self._order, weight)

    def __call__(
        self,
        x: torch.Tensor,  # [M, K] float32
        mode: int,
        norm: torch.Tensor | None = None,  # [K] float32 RMSNorm weight: x is normalized first
        eps: float = 0.0,
        residual: torch.Tensor | None = None,  # [M, N] float32, for MODE_ADD
    ) -> torch.Tensor:  # [M, n_out] float32 ([M, 2 n_out] for MODE_PLAIN on a gated matrix)
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"x {list(x.shape)} does not match a weight of {self.in_features} inputs"
            )
        rows = x.shape[0]
        if (mode == MODE_ADD) != (residual is not None) or (
            residual is not None and tuple(residual.shape) != (rows, self.n_out)
        ):
            raise ValueError(f"MODE_ADD takes a residual [{rows}, {self.n_out}], other modes none")
        width = self.n_out
        if self.gated and mode == MODE_PLAIN:  # the raw [gate | up] products
            mode, width = _MODE_GATED_PLAIN, 2 * self.n_out
        y = torch.empty((rows, width), dtype=torch.float32)
        x = _rows_ready(x)
        residual = None if residual is None else _rows_ready(residual)
        return cpu_kernels.call_gemm(
            self._fn, self._refs[mode], x, norm, eps, residual, y, "pie_f32_gemm"
        )

    def rotated(
        self,
        x: torch.Tensor,  # [M, K] float32
        positions: torch.Tensor,  # [M] int64, each < the tables' rows
        cos: torch.Tensor,  # [max_position, head_dim] float32 table
        sin: torch.Tensor,  # [max_position, head_dim] float32 table, first half negated
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
    ) -> torch.Tensor:  # [M, N]: x @ W.T + bias, RoPE applied to outputs [0, rope_cols)
        """The matmul with RoPE folded in: what `rope` would give for the q/k heads of
        `self(x, MODE_PLAIN)`, bit for bit, without another pass over them."""
        if not self.rope_cols:
            raise ValueError("this matrix was packed without a RoPE layout")
        if x.dim() != 2 or x.shape[1] != self.in_features or positions.shape != x.shape[:1]:
            raise ValueError(
                f"x {list(x.shape)} and positions {list(positions.shape)} do not match a weight "
                f"of {self.in_features} inputs"
            )
        head_dim = self.head_dim
        if cos.shape[1:] != (head_dim,) or sin.shape != cos.shape or cos.dtype != torch.float32:
            raise ValueError(f"RoPE tables must be float32 [max_position, {head_dim}]")
        rows = x.shape[0]
        y = torch.empty((rows, self.n_out), dtype=torch.float32)
        if rows == 0:
            return y
        x = _rows_ready(x)
        positions = positions.to(torch.int64).contiguous()
        rc = self._rope_fn(
            self._refs[MODE_PLAIN],
            x.data_ptr(),
            x.stride(0),
            rows,
            None if norm is None else norm.data_ptr(),
            eps,
            positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            y.data_ptr(),
            y.stride(0),
            torch.get_num_threads(),
        )
        cpu_kernels.check(rc, f"pie_f32_gemm_rope on {rows} rows")
        return y


# ---- attention -------------------------------------------------------------------------------------
def decode_attention_supported(heads: int, kv_heads: int, dim: int) -> bool:
    """Whether decode_attention takes these shapes here (and the library loads)."""
    return dim % 8 == 0 and kv_heads > 0 and heads % kv_heads == 0 and load() is not None


def decode_attention(
    q: torch.Tensor,  # [B, H, D] float32, last dim contiguous
    k_cache: torch.Tensor,  # [rows, KH, D] float32, contiguous
    v_cache: torch.Tensor,
    kv_rows: torch.Tensor,  # [B, Lmax] int64: cache row of each slot
    kv_lens: torch.Tensor,  # [B] int64: slots each sequence reads
    mask: torch.Tensor | None,  # [B, Lmax] bool (True = attend), or None for all
    scale: float,
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # [B, H, D] float32
    """One-token-per-sequence attention straight from the paged cache.

    `new` = (k [B, KH, D], v [B, KH, D], slot_rows [B]): written to the cache first.
    """
    lib = load()
    assert lib is not None, "decode_attention needs the kernel library"
    return cpu_kernels.call_decode_attention(
        lib.pie_f32_decode_attention, torch.float32, q, k_cache, v_cache, kv_rows, kv_lens, mask,
        scale, new,
    )  # fmt: skip


# ---- RoPE ------------------------------------------------------------------------------------------
def rope(
    lib: ctypes.CDLL,
    x: torch.Tensor,  # [T, heads, D] float32, heads D apart, rows any distance apart
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor,  # [max_position, D] float32 table
    sin: torch.Tensor,  # [max_position, D] float32 table, first half negated
) -> torch.Tensor | None:  # [T, heads, D] contiguous, or None where the kernel does not take x
    if x.shape[2] % 16:
        return None
    return cpu_kernels.call_rope(lib.pie_f32_rope, torch.float32, x, positions, cos, sin)


# ---- a decode step's layers in one call ------------------------------------------------------------
class DecodeLayers:
    """A model's layers as one pie_f32_decode_layers call for batches of one-token decodes.

    Each layer is (qkv with a RoPE layout, o, gate_up (gated), down, attn_norm, mlp_norm, its
    K cache, its V cache [rows, KH, D]); the matmuls' packings and the caches stay where they
    are (this holds pointers to them: keep them alive as long as this).
    """

    def __init__(
        self,
        lib: ctypes.CDLL,
        layers: list[
            tuple[
                PackedF32Gemm,
                PackedF32Gemm,
                PackedF32Gemm,
                PackedF32Gemm,
                torch.Tensor,
                torch.Tensor,
                torch.Tensor,
                torch.Tensor,
            ]
        ],
        heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
    ) -> None:
        qkv, o, gate_up, down = layers[0][:4]
        if not (qkv.rope_cols and not o.gated and gate_up.gated and not down.gated):
            raise ValueError("DecodeLayers takes (qkv with RoPE, o, gate_up, down) per layer")
        self._fn = lib.pie_f32_decode_layers
        self._table = (_DecodeLayer * len(layers))(
            *(
                _DecodeLayer(
                    ctypes.addressof(qkv._specs[MODE_PLAIN]),
                    ctypes.addressof(o._specs[MODE_ADD]),
                    ctypes.addressof(gate_up._specs[MODE_SWIGLU]),
                    ctypes.addressof(down._specs[MODE_ADD]),
                    *(t.data_ptr() for t in tensors),
                )
                for qkv, o, gate_up, down, *tensors in layers
            )
        )
        self._keep = layers
        self.hidden, self.mlp = qkv.in_features, gate_up.n_out
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps
        self.qkv_width = qkv.n_out

    def __call__(
        self,
        x: torch.Tensor,  # [B, hidden] float32 contiguous: the residual stream, updated in place
        positions: torch.Tensor,  # [B] int64
        cos: torch.Tensor,  # [max_position, D] RoPE tables (sin's first half negated)
        sin: torch.Tensor,
        kv_rows: torch.Tensor,  # [B, Lmax] int64: cache row of each slot
        kv_lens: torch.Tensor,  # [B] int64
        mask: torch.Tensor | None,  # [B, Lmax] bool, or None for all
        slot_rows: torch.Tensor,  # [B] int64: where each new token's K/V goes
        scale: float,
    ) -> torch.Tensor:  # x, after every layer
        batch = x.shape[0]
        if (
            x.shape != (batch, self.hidden)
            or not x.is_contiguous()
            or x.dtype != torch.float32
            or kv_rows.dim() != 2
            or kv_rows.shape[0] != batch
            or any(t.shape != (batch,) for t in (positions, kv_lens, slot_rows))
            or any(
                t.dtype != torch.int64 or not t.is_contiguous()
                for t in (positions, kv_rows, kv_lens, slot_rows)
            )
            or (mask is not None and (mask.shape != kv_rows.shape or mask.dtype != torch.bool))
        ):
            raise ValueError(
                f"decode layers: x {list(x.shape)}, rows {list(kv_rows.shape)}, lens "
                f"{list(kv_lens.shape)} do not fit together (or are not float32 / int64 / bool)"
            )
        if mask is not None:
            mask = mask.contiguous()
        scratch = torch.empty(batch * (self.qkv_width + self.heads * self.head_dim + self.mlp))
        qkv = scratch[: batch * self.qkv_width]
        attn = scratch[qkv.numel() : qkv.numel() + batch * self.heads * self.head_dim]
        h = scratch[qkv.numel() + attn.numel() :]
        rc = self._fn(
            self._table,
            len(self._table),
            x.data_ptr(),
            batch,
            self.hidden,
            self.mlp,
            self.eps,
            positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            kv_rows.data_ptr(),
            kv_lens.data_ptr(),
            None if mask is None else mask.data_ptr(),
            kv_rows.shape[1],
            slot_rows.data_ptr(),
            self.heads,
            self.kv_heads,
            self.head_dim,
            scale,
            qkv.data_ptr(),
            attn.data_ptr(),
            h.data_ptr(),
            torch.get_num_threads(),
        )
        cpu_kernels.check(rc, f"decode layers on {batch} sequences")
        return x
