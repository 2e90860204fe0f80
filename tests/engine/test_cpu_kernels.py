"""The C kernels of pie.engine.cpu_kernels against the torch ops they replace, in bfloat16.

Matmul results may differ from torch's in the last bf16 bit (another summation order); the
elementwise kernels repeat torch's roundings. Skipped where the kernels cannot run here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pie.engine import cpu_kernels
from pie.engine.linear import Linear, rms_norm
from pie.engine.model import apply_rope
from tests.engine.attention_reference import (
    new_kv_case,
    random_decode_case,
    reference_attention,
)

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None, reason="needs x86-64 AVX512-BF16 and a C compiler"
)
BF16 = torch.bfloat16


def lib() -> object:
    loaded = cpu_kernels.load()
    assert loaded is not None
    return loaded


def assert_close_bf16(
    got: torch.Tensor, want: torch.Tensor, ulps: int = 1, scale: torch.Tensor | None = None
) -> None:
    """Equal up to `ulps` units in the last place of bf16 (2^-7 relative) of `scale` (default
    |want|; a sum that cancels needs the size of its terms instead)."""
    got, want = got.float(), want.float()
    size = want.abs() if scale is None else scale.float()
    tol = ulps * size.clamp_min(1e-2) * 2.0**-7
    bad = (got - want).abs() > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} differ; max {(got - want).abs().max()}"
    )


@pytest.mark.parametrize("rows", [0, 1, 3, 7, 64])  # 0: a forward with no outputs
@pytest.mark.parametrize(("n", "k"), [(960, 576), (100, 70)])
def test_gemv_modes_match_torch(rows: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(BF16)
    b = torch.randn(n, generator=gen).to(BF16)
    x = torch.randn(rows, k, generator=gen).to(BF16)
    norm = (torch.rand(k, generator=gen) + 0.5).to(BF16)
    res = torch.randn(rows, n, generator=gen).to(BF16)
    plain = cpu_kernels.PackedGemv(lib(), w, None, gated=False)  # type: ignore[arg-type]
    biased = cpu_kernels.PackedGemv(lib(), w, b, gated=False)  # type: ignore[arg-type]
    assert_close_bf16(plain(x, cpu_kernels.MODE_PLAIN), F.linear(x, w))
    assert_close_bf16(biased(x, cpu_kernels.MODE_PLAIN), F.linear(x, w, b))
    normed = rms_norm(x, norm, 1e-5)
    assert_close_bf16(plain(x, cpu_kernels.MODE_PLAIN, norm, 1e-5), F.linear(normed, w))
    got = plain(x, cpu_kernels.MODE_ADD, residual=res)
    assert_close_bf16(got, res + F.linear(x, w), ulps=2)


@pytest.mark.parametrize("rows", [1, 5, 32])
def test_gated_gemv_is_swiglu(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = (torch.randn(2 * 96, 64, generator=gen) * 0.2).to(BF16)
    x = torch.randn(rows, 64, generator=gen).to(BF16)
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    got = cpu_kernels.PackedGemv(lib(), w, None, gated=True)(x, cpu_kernels.MODE_SWIGLU)  # type: ignore[arg-type]
    assert_close_bf16(got, F.silu(gate) * up, ulps=2)


def test_linear_takes_the_kernel_and_the_torch_path_alike() -> None:
    """Row counts on both sides of GEMV_MAX_ROWS give torch's results."""
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(192, 128, generator=gen) * 0.1).to(BF16)
    linear = Linear(w)
    assert linear.gemv is not None
    for rows in (1, 64, 65, 200):
        x = torch.randn(rows, 128, generator=gen).to(BF16)
        res = torch.randn(rows, 192, generator=gen).to(BF16)
        product = F.linear(x, w)
        # torch rounds the product to bf16 before adding, the kernel after: where res cancels
        # the product the two differ by an ulp of the terms, not of their small sum
        terms = res.float().abs() + product.float().abs()
        assert_close_bf16(linear(x, residual=res), res + product, ulps=2, scale=terms)


def test_weights_packed_into_an_arena_give_the_same_results() -> None:
    gen = torch.Generator().manual_seed(3)
    arena = cpu_kernels.HugePageArena()
    x = torch.randn(2, 64, generator=gen).to(BF16)
    for n in (64, 130, 256):  # 130: padded to whole blocks
        w = (torch.randn(n, 64, generator=gen) * 0.1).to(BF16)
        alone = cpu_kernels.PackedGemv(lib(), w, None, gated=False)  # type: ignore[arg-type]
        packed = cpu_kernels.PackedGemv(lib(), w, None, gated=False, arena=arena)  # type: ignore[arg-type]
        assert torch.equal(alone(x, cpu_kernels.MODE_PLAIN), packed(x, cpu_kernels.MODE_PLAIN))


@pytest.mark.parametrize("rows", [1, 33, 300])
def test_elementwise_kernels_repeat_torch_roundings(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=gen) * 3).to(BF16)
    w = (torch.rand(576, generator=gen) + 0.5).to(BF16)
    ref_norm = w * (x.float() * x.float().square().mean(-1, keepdim=True).add(1e-5).rsqrt()).to(
        BF16
    )
    assert_close_bf16(cpu_kernels.rms_norm(lib(), x, w, 1e-5), ref_norm)  # type: ignore[arg-type]
    gu = (torch.randn(rows, 2 * 200, generator=gen) * 3).to(BF16)
    gate, up = gu.chunk(2, dim=-1)
    assert_close_bf16(cpu_kernels.swiglu(lib(), gu), F.silu(gate) * up)  # type: ignore[arg-type]


def test_rope_kernel_matches_apply_rope() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, heads, dim = 37, 12, 64
    qkv = torch.randn(tokens, 15 * dim, generator=gen).to(BF16)
    x = qkv[:, : heads * dim].view(tokens, heads, dim)  # rows 15 * dim apart, as in the model
    positions = torch.randint(0, 8000, (tokens,), generator=gen)
    freqs = torch.outer(torch.arange(8192).float(), 1e5 ** -(torch.arange(0, dim, 2) / dim))
    cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(BF16)
    sin = torch.cat([-freqs.sin(), freqs.sin()], -1).to(BF16)
    got = cpu_kernels.rope(lib(), x, positions, cos, sin)  # type: ignore[arg-type]
    assert got is not None
    want = apply_rope(x, cos[positions][:, None], sin[positions][:, None])
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "dim", "l_max"),
    [
        (1, 9, 3, 64, 150),
        (5, 9, 3, 64, 40),
        (3, 8, 8, 128, 17),
        (2, 32, 8, 128, 300),
        (4, 4, 1, 64, 1),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_float_reference(
    batch: int, heads: int, kv_heads: int, dim: int, l_max: int, masked: bool
) -> None:
    q, k_cache, v_cache, rows, lens, mask = random_decode_case(
        batch, heads, kv_heads, dim, l_max, masked, BF16
    )
    got = cpu_kernels.decode_attention(q, k_cache, v_cache, rows, lens, mask, dim**-0.5)
    want = reference_attention(q, k_cache, v_cache, rows, lens, mask, dim**-0.5)
    assert_close_bf16(got, want)


def test_decode_attention_writes_new_kv_before_reading() -> None:
    q, k_cache, v_cache, k, v, slots, rows, lens = new_kv_case(BF16)
    got = cpu_kernels.decode_attention(
        q, k_cache, v_cache, rows, lens, None, 0.125, new=(k, v, slots)
    )
    assert torch.equal(k_cache[slots], k) and torch.equal(v_cache[slots], v)
    want = reference_attention(q, k_cache, v_cache, rows, lens, None, 0.125)
    assert_close_bf16(got, want)


@pytest.mark.slow
def test_bf16_model_with_kernels_is_as_accurate_as_without(monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2 prefill + decode, teacher-forced: bf16 with kernels vs bf16 with torch ops, both
    against float32. Summation order moves bf16 logits by ~0.1 either way; a wrong row, position
    or rounding in a kernel moves them by units."""
    from pie.engine.attention import TorchAttention
    from pie.engine.loader import load_model
    from pie.engine.model import LlamaModel
    from pie.engine.request import ForwardBatch, SequenceForward

    loaded = load_model(None)
    cfg = loaded.config
    kernel_load = cpu_kernels.load

    def run(dtype: torch.dtype, kernels: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(cpu_kernels, "load", kernel_load if kernels else lambda: None)
        model = LlamaModel(cfg, loaded.weights, torch.device("cpu"), dtype)
        assert (model.layers[0].qkv.gemv is not None) == (kernels and dtype == BF16)
        attention = TorchAttention()
        cache = torch.zeros(cfg.num_layers, 2, 8, 16, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
        prompts = [[504, 3458, 314, 260, 1345, 30, 657, 1012, 1001], [42, 43, 44, 45, 46]]
        forced = [[271, 283, 98, 30, 49], [30, 49, 1018, 4793, 1809]]  # decode inputs, fixed
        pages = [[3, 5, 1], [7, 2]]
        seqs = [
            SequenceForward(p, list(range(len(p))), g, 0)
            for p, g in zip(prompts, pages, strict=True)
        ]
        rows = torch.tensor([len(prompts[0]) - 1, len(prompts[0]) + len(prompts[1]) - 1])
        steps = []
        with torch.inference_mode():
            for step in range(6):  # prefill both, then five decode steps of both
                meta = attention.prepare(ForwardBatch(seqs), 16, torch.device("cpu"))
                tokens = torch.tensor([t for s in seqs for t in s.tokens])
                positions = torch.tensor([p for s in seqs for p in s.positions])
                steps.append(model.forward(tokens, positions, rows, cache, attention, meta))
                for s, f in zip(seqs, forced, strict=True):
                    s.context_len += len(s.tokens)
                    s.tokens, s.positions = [f[min(step, 4)]], [s.context_len]
                rows = torch.arange(2)
        monkeypatch.undo()
        return steps

    exact, ours, reference = run(torch.float32, False), run(BF16, True), run(BF16, False)
    for want, a, b in zip(exact, ours, reference, strict=True):
        ours_err, ref_err = (a - want).abs().mean().item(), (b - want).abs().mean().item()
        assert ours_err < 1.5 * ref_err + 0.02, (ours_err, ref_err)
