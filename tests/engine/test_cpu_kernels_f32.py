"""The float32 C kernels of pie.engine.cpu_kernels_f32 against the torch ops they replace.

Matmuls and attention differ from torch only in summation order (well under 1e-4 here); RoPE
repeats torch's roundings exactly. Skipped where the kernels cannot run (not x86-64 AVX2+FMA).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType

from pie.engine import cpu_kernels, cpu_kernels_f32, random_model
from pie.engine.attention import TorchAttention
from pie.engine.gguf_tensors import BlockWeight
from pie.engine.linear import Linear, rms_norm
from pie.engine.loader import load_model
from pie.engine.model import LlamaModel, apply_rope
from pie.engine.request import ForwardBatch, SequenceForward
from tests.engine.attention_reference import (
    new_kv_case,
    random_decode_case,
    reference_attention,
)

pytestmark = pytest.mark.skipif(
    cpu_kernels_f32.load() is None, reason="needs x86-64 AVX2 + FMA and a C compiler"
)
CPU = torch.device("cpu")
F64 = torch.float64  # the reference attention's arithmetic


def lib() -> Any:
    loaded = cpu_kernels_f32.load()
    assert loaded is not None
    return loaded


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# 0: a forward with no outputs; 7, 33: tiles of uneven sizes; 500: several row chunks
@pytest.mark.parametrize("rows", [0, 1, 2, 7, 33, 500])
@pytest.mark.parametrize(("n", "k"), [(960, 576), (100, 70)])  # 100, 70: partial panel, tails
def test_gemm_modes_match_torch(rows: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    w = torch.randn(n, k, generator=gen) * 0.1
    b = torch.randn(n, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    norm = torch.rand(k, generator=gen) + 0.5
    res = torch.randn(rows, n, generator=gen)
    plain = cpu_kernels_f32.PackedF32Gemm(lib(), w, None, gated=False)
    biased = cpu_kernels_f32.PackedF32Gemm(lib(), w, b, gated=False)
    close(plain(x, cpu_kernels_f32.MODE_PLAIN), F.linear(x, w))
    close(biased(x, cpu_kernels_f32.MODE_PLAIN), F.linear(x, w, b))
    normed = rms_norm(x, norm, 1e-5)
    close(plain(x, cpu_kernels_f32.MODE_PLAIN, norm, 1e-5), F.linear(normed, w))
    close(biased(x, cpu_kernels_f32.MODE_ADD, residual=res), res + F.linear(x, w, b))


def test_gemm_reads_strided_rows() -> None:
    """Rows further apart than their width (views into a wider tensor), as the model passes."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 48, generator=gen)
    wide = torch.randn(9, 100, generator=gen)
    x, res = wide[:, :48], torch.randn(9, 130, generator=gen)[:, 10:74]
    got = cpu_kernels_f32.PackedF32Gemm(lib(), w, None, gated=False)(
        x, cpu_kernels_f32.MODE_ADD, residual=res
    )
    close(got, res + F.linear(x, w))


@pytest.mark.parametrize("rows", [1, 5, 32, 200])
@pytest.mark.parametrize("half", [96, 100])
def test_gated_gemm_is_swiglu(rows: int, half: int) -> None:
    gen = torch.Generator().manual_seed(rows + half)
    w = torch.randn(2 * half, 64, generator=gen) * 0.2
    x = torch.randn(rows, 64, generator=gen)
    norm = torch.rand(64, generator=gen) + 0.5
    gemm = cpu_kernels_f32.PackedF32Gemm(lib(), w, None, gated=True)
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    close(gemm(x, cpu_kernels_f32.MODE_SWIGLU), F.silu(gate) * up)
    gate, up = F.linear(rms_norm(x, norm, 1e-6), w).chunk(2, dim=-1)
    close(gemm(x, cpu_kernels_f32.MODE_SWIGLU, norm, 1e-6), F.silu(gate) * up)
    close(gemm(x, cpu_kernels_f32.MODE_PLAIN), F.linear(x, w))  # the raw [gate | up] product
    close(Linear(w, gated=True)(x), F.linear(x, w))  # as the CUDA model's path calls it


@pytest.mark.parametrize(("n", "gated"), [(64, False), (130, False), (200, True), (192, True)])
def test_packing_round_trips_and_arena_packs_alike(n: int, gated: bool) -> None:
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, 40, generator=gen)
    x = torch.randn(3, 40, generator=gen)
    mode = cpu_kernels_f32.MODE_SWIGLU if gated else cpu_kernels_f32.MODE_PLAIN
    alone = cpu_kernels_f32.PackedF32Gemm(lib(), w, None, gated)
    in_arena = cpu_kernels_f32.PackedF32Gemm(
        lib(), w, None, gated, arena=cpu_kernels.HugePageArena()
    )
    assert torch.equal(alone.unpack(), w)
    assert torch.equal(alone(x, mode), in_arena(x, mode))


def random_blocks(qtype: QType, rows: int, k: int, seed: int) -> BlockWeight:
    """Random GGUF blocks of `qtype` ([rows, k] values): float16 scales, random values."""
    gen = torch.Generator().manual_seed(seed)
    n = rows * k // 32
    scales = (torch.randn(n, 2, generator=gen) * 0.05).half().view(torch.uint8)  # d, m
    if qtype == QType.Q4_1:
        values = torch.randint(0, 256, (n, 16), generator=gen, dtype=torch.uint8)
        data = torch.cat([scales, values], dim=1)  # d, m, 16 bytes of nibbles
    else:
        values = torch.randint(-128, 128, (n, 32), generator=gen, dtype=torch.int8)
        data = torch.cat([scales[:, :2], values.view(torch.uint8)], dim=1)  # d, 32 int8
    return BlockWeight(qtype, data.reshape(rows, -1))


# 1: the streaming path; 7, 33: tiles; 500: several row chunks
@pytest.mark.parametrize("rows", [1, 7, 33, 500])
@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0])
def test_gemm_from_gguf_blocks_is_the_float32_gemm_bit_for_bit(rows: int, qtype: QType) -> None:
    gen = torch.Generator().manual_seed(rows)
    blocks, gated_blocks = random_blocks(qtype, 200, 96, 1), random_blocks(qtype, 192, 96, 2)
    w, gated_w = blocks.dequantize(), gated_blocks.dequantize()
    bias = torch.randn(200, generator=gen)
    x, res = torch.randn(rows, 96, generator=gen), torch.randn(rows, 200, generator=gen)
    norm = torch.rand(96, generator=gen) + 0.5
    positions = torch.randint(0, 512, (rows,), generator=gen)
    cos, sin = rope_tables(32)
    arena = cpu_kernels.HugePageArena()
    for kw in ({}, {"arena": arena}):
        plain = cpu_kernels_f32.PackedF32Gemm(lib(), w, bias, False, rope_heads=4, head_dim=32)
        packed = cpu_kernels_f32.PackedF32Gemm(
            lib(), w, bias, False, rope_heads=4, head_dim=32, blocks=blocks, **kw
        )
        assert torch.equal(packed.unpack(), w)
        for mode, extra in (
            (cpu_kernels_f32.MODE_PLAIN, {}),
            (cpu_kernels_f32.MODE_ADD, {"residual": res}),
        ):
            assert torch.equal(
                packed(x, mode, norm, 1e-5, **extra), plain(x, mode, norm, 1e-5, **extra)
            )
        rotated = packed.rotated(x, positions, cos, sin, norm, 1e-5)
        assert torch.equal(rotated, plain.rotated(x, positions, cos, sin, norm, 1e-5))
        gated = cpu_kernels_f32.PackedF32Gemm(lib(), gated_w, None, True, blocks=gated_blocks, **kw)
        gated_plain = cpu_kernels_f32.PackedF32Gemm(lib(), gated_w, None, True)
        for mode in (cpu_kernels_f32.MODE_SWIGLU, cpu_kernels_f32.MODE_PLAIN):
            assert torch.equal(gated(x, mode), gated_plain(x, mode))
    close(plain(x, cpu_kernels_f32.MODE_PLAIN), F.linear(x, w, bias))  # and both are the matmul


def test_linear_packs_only_the_blocks_and_runs_them_for_every_row_count() -> None:
    blocks = random_blocks(QType.Q4_1, 64, 64, 5)
    w = blocks.dequantize()
    linear = Linear(w, blocks=blocks)
    assert linear.f32 is not None and linear.f32.qtype == QType.Q4_1 and linear.weight is None
    assert linear.nbytes == 4 * 2 * 384  # 4 panels of 2 records: the whole packing
    for rows in (1, 6, 7, 32, 200):  # one tile, several, and more than a chunk of rows
        x = torch.randn(rows, 64)
        close(linear(x), F.linear(x, w))
    assert torch.equal(linear.unpacked(), w)
    other = Linear(w, blocks=random_blocks(QType.Q4_1, 64, 32, 6))  # not w's blocks: float32
    assert other.f32 is not None and other.f32.qtype is None
    assert other.nbytes == 64 * 64 * 4


def test_loader_keeps_the_gguf_blocks_of_the_embedded_model() -> None:
    loaded = load_model()
    for key in ("layers.0.wq", "layers.0.wk", "layers.3.w_down", "embed"):
        assert torch.equal(loaded.blocks[key].dequantize(), loaded.weights[key]), key
    assert loaded.blocks["layers.0.wq"].qtype == QType.Q4_1
    assert loaded.blocks["embed"].qtype == QType.Q8_0


def test_default_cpu_dtype_is_float32_where_the_kernels_stream_gguf_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blocks outrank native bf16 (fewer bytes, exact results); without them bf16 CPUs get bf16."""
    from pie.engine import engine

    cpu = torch.device("cpu")
    blocks = {"layers.0.wq": random_blocks(QType.Q4_1, 64, 64, 5)}
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: True)
    assert engine.default_dtype(cpu, blocks) == torch.float32
    assert engine.default_dtype(cpu, {}) == torch.bfloat16
    assert engine.default_dtype(torch.device("cuda"), blocks) == torch.bfloat16
    monkeypatch.setenv("PIE_CPU_BLOCK_WEIGHTS", "0")
    assert engine.default_dtype(cpu, blocks) == torch.bfloat16
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: False)
    assert engine.default_dtype(cpu, blocks) == torch.float32


def test_linear_uses_the_kernel_for_every_row_count() -> None:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(192, 128, generator=gen) * 0.1
    linear = Linear(w.clone())
    assert linear.f32 is not None and linear.weight is None
    assert torch.equal(linear.unpacked(), w)  # type: ignore[arg-type]
    for rows in (1, 64, 65, 300):
        x = torch.randn(rows, 128, generator=gen)
        res = torch.randn(rows, 192, generator=gen)
        close(linear(x, residual=res), res + F.linear(x, w))


@pytest.mark.parametrize("wide", ["0", "1"])
def test_wide_rows_go_to_torchs_gemm_with_the_same_results(
    monkeypatch: pytest.MonkeyPatch, wide: str
) -> None:
    """From WIDE_MIN_ROWS rows a float32 [in, out] copy runs through torch's GEMM where asked
    (AVX-512 CPUs by default); norm, residual and SwiGLU mean the same on both paths."""
    from pie.engine import linear as linear_module

    monkeypatch.setenv("PIE_CPU_WIDE_GEMM", wide)
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(192, 128, generator=gen) * 0.1
    norm = torch.rand(128, generator=gen) + 0.5
    plain, gated = Linear(w.clone()), Linear(w.clone(), gated=True)
    assert (plain.wide is not None) == (wide == "1") and plain.nbytes == 192 * 128 * 4
    for rows in (linear_module.WIDE_MIN_ROWS - 1, linear_module.WIDE_MIN_ROWS, 300):
        assert plain.runs_wide(rows) == (wide == "1" and rows >= linear_module.WIDE_MIN_ROWS)
        x = torch.randn(rows, 128, generator=gen)
        res = torch.randn(rows, 192, generator=gen)
        close(plain(x, residual=res), res + F.linear(x, w))
        close(plain(x, norm=norm, eps=1e-5), F.linear(rms_norm(x, norm, 1e-5), w))
        gate, up = F.linear(rms_norm(x, norm, 1e-5), w).chunk(2, dim=-1)
        close(gated.swiglu(x, norm=norm, eps=1e-5), F.silu(gate) * up)


def test_rope_kernel_matches_apply_rope_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, heads, dim = 37, 12, 64
    qkv = torch.randn(tokens, 15 * dim, generator=gen)
    x = qkv[:, : heads * dim].view(tokens, heads, dim)  # rows 15 * dim apart, as in the model
    positions = torch.randint(0, 8000, (tokens,), generator=gen)
    freqs = torch.outer(torch.arange(8192).float(), 1e5 ** -(torch.arange(0, dim, 2) / dim))
    cos = torch.cat([freqs.cos(), freqs.cos()], -1)
    sin = torch.cat([-freqs.sin(), freqs.sin()], -1)
    got = cpu_kernels_f32.rope(lib(), x, positions, cos, sin)
    assert got is not None
    assert torch.equal(got, apply_rope(x, cos[positions][:, None], sin[positions][:, None]))


def rope_tables(dim: int, positions: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.outer(torch.arange(positions).float(), 1e4 ** -(torch.arange(0, dim, 2) / dim))
    return torch.cat([freqs.cos(), freqs.cos()], -1), torch.cat([-freqs.sin(), freqs.sin()], -1)


@pytest.mark.parametrize("rows", [1, 2, 7, 33])  # 1: the streaming path; more: the tiles
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 16), (2, 1, 128)])
def test_gemm_with_rope_folded_in_rotates_as_the_rope_kernel(
    rows: int, heads: int, kv_heads: int, dim: int
) -> None:
    gen = torch.Generator().manual_seed(rows + dim)
    qk, n, k = (heads + kv_heads) * dim, (heads + 2 * kv_heads) * dim, 70
    w = torch.randn(n, k, generator=gen) * 0.1
    b = torch.randn(n, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    norm = torch.rand(k, generator=gen) + 0.5
    positions = torch.randint(0, 512, (rows,), generator=gen)
    cos, sin = rope_tables(dim)
    plain = cpu_kernels_f32.PackedF32Gemm(lib(), w, b, gated=False)
    folded = cpu_kernels_f32.PackedF32Gemm(
        lib(), w, b, gated=False, rope_heads=heads + kv_heads, head_dim=dim
    )
    assert torch.equal(folded.unpack(), w)
    want = plain(x, cpu_kernels_f32.MODE_PLAIN, norm, 1e-5)
    # the layout is invisible to a plain call: each sum is taken in the same order
    assert torch.equal(folded(x, cpu_kernels_f32.MODE_PLAIN, norm, 1e-5), want)
    got = folded.rotated(x, positions, cos, sin, norm, 1e-5)
    rotated = cpu_kernels_f32.rope(lib(), want[:, :qk].view(rows, -1, dim), positions, cos, sin)
    assert rotated is not None
    assert torch.equal(got[:, :qk], rotated.view(rows, qk))  # bit for bit, bias included
    assert torch.equal(got[:, qk:], want[:, qk:])  # v as it was


def test_linear_folds_rope_only_where_the_layout_fits() -> None:
    gen = torch.Generator().manual_seed(3)
    x, positions = torch.randn(5, 32, generator=gen), torch.arange(5)
    for dim, folds in ((64, True), (40, False)):
        w = torch.randn(4 * dim, 32, generator=gen)
        linear = Linear(w, rope_heads=3, head_dim=dim)
        assert linear.folds_rope == folds
        cos, sin = rope_tables(dim)
        if not folds:
            with pytest.raises(ValueError, match="does not fold RoPE"):
                linear.rotated(x, positions, cos, sin)
            continue
        y = F.linear(x, w)
        want = apply_rope(
            y[:, : 3 * dim].view(5, 3, dim), cos[positions][:, None], sin[positions][:, None]
        )
        got = linear.rotated(x, positions, cos, sin)
        close(got[:, : 3 * dim], want.reshape(5, -1))
        close(got[:, 3 * dim :], y[:, 3 * dim :])


def test_gemm_with_rope_refuses_what_its_layout_cannot_take() -> None:
    w = torch.randn(6 * 64, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_kernels_f32.PackedF32Gemm(lib(), w, None, gated=False, rope_heads=4, head_dim=40)
    with pytest.raises(ValueError, match="at most its"):
        cpu_kernels_f32.PackedF32Gemm(lib(), w, None, gated=False, rope_heads=7, head_dim=64)
    cos, sin = rope_tables(64)
    x, positions = torch.randn(2, 32), torch.arange(2)
    plain = cpu_kernels_f32.PackedF32Gemm(lib(), w, None, gated=False)
    with pytest.raises(ValueError, match="without a RoPE layout"):
        plain.rotated(x, positions, cos, sin)
    folded = cpu_kernels_f32.PackedF32Gemm(lib(), w, None, gated=False, rope_heads=4, head_dim=64)
    with pytest.raises(ValueError, match="RoPE tables"):
        folded.rotated(x, positions, cos[:, :32], sin[:, :32])
    with pytest.raises(ValueError, match="positions"):
        folded.rotated(x, positions[:1], cos, sin)


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "dim", "l_max"),
    [
        (1, 9, 3, 64, 150),
        (5, 9, 3, 64, 40),
        (3, 8, 8, 128, 17),
        (2, 32, 8, 128, 300),
        (4, 4, 1, 64, 1),
        (2, 6, 2, 40, 23),  # a head size that is not a multiple of 64
        # a task per sequence, rows read in spans: 128 slots a span (3 spans), 24 (5)
        (4, 9, 3, 64, 300),
        (6, 32, 8, 128, 100),
        (1, 9, 3, 64, 700),  # one sequence cut into runs on 2 threads, then merged
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_float64_reference(
    batch: int, heads: int, kv_heads: int, dim: int, l_max: int, masked: bool
) -> None:
    q, k_cache, v_cache, rows, lens, mask = random_decode_case(
        batch, heads, kv_heads, dim, l_max, masked, torch.float32
    )
    got = cpu_kernels_f32.decode_attention(q, k_cache, v_cache, rows, lens, mask, dim**-0.5)
    close(got, reference_attention(q, k_cache, v_cache, rows, lens, mask, dim**-0.5, F64), 2e-5)


def test_decode_attention_writes_new_kv_before_reading() -> None:
    q, k_cache, v_cache, k, v, slots, rows, lens = new_kv_case(torch.float32)
    got = cpu_kernels_f32.decode_attention(
        q, k_cache, v_cache, rows, lens, None, 0.125, new=(k, v, slots)
    )
    assert torch.equal(k_cache[slots], k) and torch.equal(v_cache[slots], v)
    close(got, reference_attention(q, k_cache, v_cache, rows, lens, None, 0.125, F64), 2e-5)


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen3"])
def test_float32_model_with_kernels_matches_torch_ops(
    shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random model's prefill, decodes and a mixed batch: kernels on and off agree."""
    built = random_model.build(shape)
    cfg = built.config
    kernel_load = cpu_kernels_f32.load

    def run(kernels: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(cpu_kernels_f32, "load", kernel_load if kernels else lambda: None)
        model = LlamaModel(cfg, built.weights, CPU, torch.float32)
        assert (model.layers[0].gate_up.f32 is not None) == kernels
        attention = TorchAttention()
        cache = torch.zeros(cfg.num_layers, 2, 12, 16, cfg.num_kv_heads, cfg.head_dim)
        seqs = [
            SequenceForward([5, 9, 2, 7, 1, 3, 8, 4, 6], list(range(9)), [3, 5], 0),
            SequenceForward([11, 12, 13, 14], list(range(4)), [7, 2], 0),
        ]
        outs = []
        for step in range(4):  # prefill both, two decodes of both, then a decode + a prefill
            meta = attention.prepare(ForwardBatch(seqs), 16, CPU)
            tokens = torch.tensor([t for s in seqs for t in s.tokens])
            positions = torch.tensor([p for s in seqs for p in s.positions])
            ends = torch.tensor(
                [sum(len(s.tokens) for s in seqs[: i + 1]) - 1 for i in range(len(seqs))]
            )
            with torch.inference_mode():
                outs.append(model.forward(tokens, positions, ends, cache, attention, meta))
            for s in seqs:
                s.context_len += len(s.tokens)
                s.tokens, s.positions = [17 + step], [s.context_len]
            if step == 2:
                seqs[1].tokens = [21, 22, 23]
                seqs[1].positions = list(range(seqs[1].context_len, seqs[1].context_len + 3))
        monkeypatch.undo()
        return outs

    for with_kernels, without in zip(run(True), run(False), strict=True):
        close(with_kernels, without, 1e-4)


@pytest.mark.parametrize(("batch", "blocks_on"), [(2, True), (8, True), (8, False)])
def test_decode_step_in_one_call_is_the_per_layer_forward_bit_for_bit(
    batch: int, blocks_on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pie_f32_decode_layers runs the kernels the per-layer forward calls, on the same data,
    from the GGUF blocks or (PIE_CPU_BLOCK_WEIGHTS=0) from the float32 packing."""
    if not blocks_on:
        monkeypatch.setenv("PIE_CPU_BLOCK_WEIGHTS", "0")
    built = random_model.build("tiny")
    cfg = built.config
    weights, blocks = dict(built.weights), {}
    for i in range(cfg.num_layers):  # the model's matrices as Q4_1 blocks
        for j, name in enumerate(("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")):
            key = f"layers.{i}.{name}"
            blocks[key] = random_blocks(QType.Q4_1, *weights[key].shape, seed=10 * i + j)
            weights[key] = blocks[key].dequantize()
    model = LlamaModel(cfg, weights, CPU, torch.float32, blocks=blocks)
    assert model.layers[0].qkv.f32 is not None
    assert model.layers[0].qkv.f32.qtype == (QType.Q4_1 if blocks_on else None)
    attention = TorchAttention()
    per_layer = LlamaModel._decode_layers

    def decode_steps(one_call: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        monkeypatch.setattr(
            LlamaModel, "_decode_layers", per_layer if one_call else lambda *_: None
        )
        cache = torch.zeros(cfg.num_layers, 2, 4 * batch, 16, cfg.num_kv_heads, cfg.head_dim)
        seqs = [
            SequenceForward([3 + b, 9, 2, 7, 1][: 2 + b % 4], [], [4 * b, 4 * b + 1], 0)
            for b in range(batch)
        ]
        outs = []
        for step in range(3):  # prefill, then two steps of one-token decodes
            for s in seqs:
                s.positions = list(range(s.context_len, s.context_len + len(s.tokens)))
            if step == 2:  # a custom mask: the last new token skips slot 1
                mask = np.ones((1, seqs[0].context_len + 1), dtype=bool)
                mask[0, 1] = False
                seqs[0].attention_mask = mask
            meta = attention.prepare(ForwardBatch(seqs), 16, CPU)
            tokens = torch.tensor([t for s in seqs for t in s.tokens])
            positions = torch.tensor([p for s in seqs for p in s.positions])
            ends = torch.tensor(np.cumsum([len(s.tokens) for s in seqs]) - 1)
            with torch.inference_mode():
                outs.append(model.forward(tokens, positions, ends, cache, attention, meta))
            for s in seqs:
                s.context_len += len(s.tokens)
                s.tokens, s.attention_mask = [11 + step], None
        return outs, cache

    (fused, fused_cache), (layered, layered_cache) = decode_steps(True), decode_steps(False)
    calls = model._decode_layer_calls
    assert len(calls) == 1
    for got, want in zip([*fused, fused_cache], [*layered, layered_cache], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
    assert fused[-1].isfinite().all()


def test_decode_step_in_one_call_refuses_bad_lengths_before_changing_anything() -> None:
    built = random_model.build("tiny")
    cfg = built.config
    model = LlamaModel(cfg, dict(built.weights), CPU, torch.float32)
    cache = torch.randn(cfg.num_layers, 2, 8, 16, cfg.num_kv_heads, cfg.head_dim)
    layers = model._decode_layers(cache)
    assert layers is not None
    x = torch.randn(2, cfg.hidden_size)
    x_before, cache_before = x.clone(), cache.clone()
    rows = torch.arange(2 * 20).view(2, 20)
    for lens in ([5, 21], [0, 5]):  # past the rows given; nothing to attend
        with pytest.raises(RuntimeError, match="code -3"):
            layers(
                x, torch.tensor([4, 20]), model.rope_cos, model.rope_sin, rows,
                torch.tensor(lens), None, torch.tensor([4, 20]), 0.125,
            )  # fmt: skip
        assert torch.equal(x, x_before) and torch.equal(cache, cache_before)


def test_split_sequences_merge_empty_and_fully_masked_runs() -> None:
    """Runs that hold no slot (a 1-slot sequence cut in 4) or only masked slots add nothing."""
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, dim, l_max = 9, 3, 64, 520
    k_cache = torch.randn(1200, kv_heads, dim, generator=gen)
    v_cache = torch.randn(1200, kv_heads, dim, generator=gen)
    q = torch.randn(2, heads, dim, generator=gen)
    rows = torch.randint(0, 1200, (2, l_max), generator=gen)
    lens = torch.tensor([l_max, 1])
    mask = torch.zeros(2, l_max, dtype=torch.bool)
    mask[0, 3:40] = True  # only the first of sequence 0's runs attends anything
    mask[1, 0] = True
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # 2 sequences on 4 threads: 4 runs each
    try:
        got = cpu_kernels_f32.decode_attention(q, k_cache, v_cache, rows, lens, mask, 0.125)
    finally:
        torch.set_num_threads(before)
    close(got, reference_attention(q, k_cache, v_cache, rows, lens, mask, 0.125, F64), 2e-5)


@pytest.mark.parametrize("threads", [1, 16])  # 1: a task per sequence; 16: per (sequence, head)
def test_decode_attention_paths_agree(threads: int) -> None:
    gen = torch.Generator().manual_seed(threads)
    batch, heads, kv_heads, dim, l_max = 6, 12, 4, 64, 90
    k_cache = torch.randn(600, kv_heads, dim, generator=gen)
    v_cache = torch.randn(600, kv_heads, dim, generator=gen)
    q = torch.randn(batch, heads, dim, generator=gen)
    lens = torch.randint(1, l_max + 1, (batch,), generator=gen)
    rows = torch.randint(0, 600, (batch, l_max), generator=gen)
    mask = torch.rand(batch, l_max, generator=gen) > 0.3
    mask[:, 0] = True
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels_f32.decode_attention(q, k_cache, v_cache, rows, lens, mask, 0.125)
    finally:
        torch.set_num_threads(before)
    close(got, reference_attention(q, k_cache, v_cache, rows, lens, mask, 0.125, F64), 2e-5)


def test_gemm_refuses_mismatched_shapes_before_reading_memory() -> None:
    gemm = cpu_kernels_f32.PackedF32Gemm(lib(), torch.randn(32, 16), None, gated=False)
    with pytest.raises(ValueError, match="16 inputs"):
        gemm(torch.randn(2, 15), cpu_kernels_f32.MODE_PLAIN)
    with pytest.raises(ValueError, match="residual"):
        gemm(torch.randn(2, 16), cpu_kernels_f32.MODE_ADD)  # no residual
    with pytest.raises(ValueError, match="residual"):
        gemm(torch.randn(2, 16), cpu_kernels_f32.MODE_ADD, residual=torch.randn(2, 31))


def test_decode_attention_refuses_mismatched_arguments() -> None:
    cache = torch.zeros(64, 2, 32)
    q, rows, lens = torch.randn(3, 4, 32), torch.zeros(3, 5, dtype=torch.long), torch.ones(3).long()
    with pytest.raises(ValueError, match="do not fit together"):
        cpu_kernels_f32.decode_attention(q, cache, cache, rows[:2], lens, None, 0.1)
    with pytest.raises(ValueError, match="do not fit together"):
        cpu_kernels_f32.decode_attention(q, cache, cache, rows.int(), lens, None, 0.1)
    with pytest.raises(ValueError, match="do not fit together"):
        cpu_kernels_f32.decode_attention(q.double(), cache, cache, rows, lens, None, 0.1)
