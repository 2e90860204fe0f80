"""The Triton kernels against the torch reference, on CPU through Triton's interpreter.

Without CUDA the module sets TRITON_INTERPRET=1 before Triton is imported, so the kernels run
in numpy on CPU tensors (slowly: shapes are tiny, pages hold 16 slots). With CUDA they run
natively. float32 results must match TorchAttention to rounding; bfloat16 within 2 ulp, since
the interpreter truncates float32 -> bfloat16 where the GPU (and torch) round to nearest.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

pytest.importorskip("triton")

from pie.engine import random_model
from pie.engine.attention import TorchAttention
from pie.engine.cuda import TritonAttention
from pie.engine.cuda.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphs, bucket_for
from pie.engine.cuda.fused_model import FusedLlamaModel
from pie.engine.cuda.metadata import KernelConfig, TritonMetadata
from pie.engine.cuda.rms_norm import add_rms_norm, rms_norm, rms_norm_reference
from pie.engine.cuda.rope import rope, rope_reference
from pie.engine.cuda.swiglu import swiglu, swiglu_reference
from pie.engine.request import ForwardBatch, RawLogits, SequenceForward

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PAGE = 16
HEADS, KV_HEADS, DIM = 6, 2, 32  # GQA: 3 query heads per KV head
NUM_PAGES = 24
F32_TOL = 2e-5
# Small blocks keep the interpreter fast and make prefill chunks span several query blocks.
SMALL = KernelConfig(block_m=16, block_n=16, target_programs=8, split_min_slots=16)
NO_SPLIT = KernelConfig(block_m=16, block_n=16, target_programs=1)


def seq(n: int, ctx: int, pages: list[int], mask: np.ndarray | None = None) -> SequenceForward:
    return SequenceForward(
        tokens=[1] * n,
        positions=list(range(ctx, ctx + n)),
        page_ids=pages,
        context_len=ctx,
        attention_mask=mask,
    )


def random_mask(n: int, length: int, seed: int) -> np.ndarray:
    mask = np.random.default_rng(seed).random((n, length)) < 0.5
    mask[:, seed % length] = True  # every row attends somewhere
    return mask


def run_both(
    batch: ForwardBatch,
    dtype: torch.dtype = torch.float32,
    config: KernelConfig = SMALL,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, TritonMetadata]:
    """(ours, reference) outputs and caches for one layer over `batch`, same inputs."""
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(len(s.tokens) for s in batch.sequences)
    # Scores of a few units, so softmax is far from uniform and position errors show.
    cache = (torch.randn(2, NUM_PAGES, PAGE, KV_HEADS, DIM, generator=gen) * 1.5).to(DEVICE, dtype)
    # q, k, v as the model passes them: strided views into one projection output
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * DIM, generator=gen).to(DEVICE, dtype) * 1.5
    q = qkv[:, : HEADS * DIM].view(tokens, HEADS, DIM)
    k = qkv[:, HEADS * DIM : (HEADS + KV_HEADS) * DIM].view(tokens, KV_HEADS, DIM)
    v = qkv[:, (HEADS + KV_HEADS) * DIM :].view(tokens, KV_HEADS, DIM)
    ref_cache = cache.clone()
    ref = TorchAttention()
    ref_out = ref.forward(
        q, k, v, ref_cache[0], ref_cache[1], ref.prepare(batch, PAGE, DEVICE), DIM**-0.5
    )
    ours = TritonAttention(config)
    meta = ours.prepare(batch, PAGE, DEVICE)
    out = ours.forward(q, k, v, cache[0], cache[1], meta, DIM**-0.5)
    return out.float(), ref_out.float(), cache.float(), ref_cache.float(), meta


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    err = (a - b).abs().max().item()
    assert err < tol, f"max abs error {err} >= {tol}"


def test_decode_without_split_matches_reference() -> None:
    batch = ForwardBatch([seq(1, 0, [5]), seq(1, 16, [3, 9]), seq(1, 40, [1, 2, 4])])
    out, ref, cache, ref_cache, meta = run_both(batch, config=NO_SPLIT)
    assert meta.num_splits == 1
    assert_close(out, ref, F32_TOL)
    assert torch.equal(cache, ref_cache)


def test_decode_split_k_matches_reference() -> None:
    # 70 slots in 4 splits of 32 rounded: the last splits of the short sequence are empty
    batch = ForwardBatch([seq(1, 69, [7, 8, 10, 11, 12]), seq(1, 20, [13, 14])])
    out, ref, _, _, meta = run_both(batch)
    assert meta.num_splits is not None and meta.num_splits > 1
    assert_close(out, ref, F32_TOL)


def test_prefill_causal_ragged_with_context() -> None:
    # a fresh prompt over two query blocks, and a chunk appended after 21 cached slots
    batch = ForwardBatch([seq(20, 0, [6, 2]), seq(7, 21, [9, 3])])
    out, ref, cache, ref_cache, meta = run_both(batch)
    assert meta.num_prefill_blocks == 3 and meta.num_decode == 0
    assert_close(out, ref, F32_TOL)
    assert torch.equal(cache, ref_cache)


def test_custom_masks_in_prefill_and_decode() -> None:
    batch = ForwardBatch(
        [
            seq(5, 30, [4, 5, 6], random_mask(5, 35, 1)),
            seq(1, 40, [7, 8, 9], random_mask(1, 41, 2)),
            seq(3, 0, [10]),  # causal, in a batch that has masks
        ]
    )
    out, ref, _, _, _ = run_both(batch)
    assert_close(out, ref, F32_TOL)


def test_tree_mask_hides_sibling_branch() -> None:
    """Two branches after a shared prefix in one forward: changing branch x must not move y."""
    prefix, x, y = 10, 3, 4
    n = prefix + x + y
    mask = np.tril(np.ones((n, n), dtype=bool))
    mask[prefix + x :, prefix : prefix + x] = False
    batch = ForwardBatch([seq(n, 0, [3, 4], mask)])
    out, ref, _, _, _ = run_both(batch, seed=3)
    assert_close(out, ref, F32_TOL)


def test_forks_share_pages() -> None:
    # both forks read pages 1 and 2 (shared prefix) and append into their own third page
    batch = ForwardBatch([seq(1, 35, [1, 2, 11]), seq(4, 33, [1, 2, 12]), seq(1, 40, [1, 2, 13])])
    out, ref, cache, ref_cache, _ = run_both(batch)
    assert_close(out, ref, F32_TOL)
    assert torch.equal(cache, ref_cache)


def test_mixed_ragged_batch_bfloat16() -> None:
    batch = ForwardBatch(
        [
            seq(1, 50, [1, 2, 3, 4]),
            seq(18, 0, [5, 6]),
            seq(1, 20, [7, 8], random_mask(1, 21, 4)),
            seq(6, 9, [9]),
        ]
    )
    out, ref, cache, ref_cache, _ = run_both(batch, dtype=torch.bfloat16)
    assert torch.equal(cache, ref_cache)
    # |out| < 8 here: 2 ulp of bfloat16 at that scale is 1/16
    assert out.abs().max().item() < 8
    assert_close(out, ref, 2 / 16)


def test_metadata_tables() -> None:
    batch = ForwardBatch([seq(3, 14, [7, 2]), seq(1, 0, [5], random_mask(1, 1, 0))])
    meta = TritonAttention(SMALL).prepare(batch, PAGE, DEVICE)
    assert meta.slot_rows.tolist() == [7 * 16 + 14, 7 * 16 + 15, 2 * 16 + 0, 5 * 16]
    assert meta.q_start.tolist() == [0, 3, 4]
    assert meta.kv_lens.tolist() == [17, 1]
    assert meta.block_table.tolist() == [[7, 2], [5, 0]]
    assert meta.mask_off is not None and meta.mask_off.tolist() == [-1, 0]
    assert meta.decode_seqs is not None and meta.decode_seqs.tolist() == [1]
    assert meta.prefill_blocks is not None and meta.prefill_blocks.tolist() == [[0, 0]]


# ---- fused RMSNorm and RoPE -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_residual_add(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=gen).to(DEVICE, dtype)
    res = torch.randn(5, 96, generator=gen).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(DEVICE, dtype)
    tol = 1e-6 if dtype == torch.float32 else 2 / 32  # |y| < 4: 2 ulp of bf16
    assert_close(rms_norm(x, w, 1e-5).float(), rms_norm_reference(x, w, 1e-5)[0].float(), tol)
    out, total = add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_total = rms_norm_reference(x, w, 1e-5, res)
    assert_close(out.float(), ref_out.float(), tol)
    assert_close(total.float(), ref_total.float(), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_with_and_without_head_norm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 10 * DIM, generator=gen).to(DEVICE, dtype)
    x = qkv[:, : 6 * DIM].view(5, 6, DIM)  # a strided view, as the model passes
    angles = torch.randn(50, DIM // 2, generator=gen)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(DEVICE, dtype)
    sin = torch.cat([-angles.sin(), angles.sin()], -1).to(DEVICE, dtype)
    pos = torch.tensor([3, 0, 49, 7, 7], device=DEVICE)
    w = (1 + 0.1 * torch.randn(DIM, generator=gen)).to(DEVICE, dtype)
    tol = 1e-6 if dtype == torch.float32 else 3 / 64  # |y| < 4; 2 ulp plus a rounded product
    assert_close(rope(x, pos, cos, sin).float(), rope_reference(x, pos, cos, sin).float(), tol)
    assert_close(
        rms_norm(x, w, 1e-6).float(), rms_norm_reference(x, w, 1e-6)[0].float(), max(tol, 2 / 32)
    )
    got = rope(x, pos, cos, sin, w, 1e-6).float()
    assert_close(got, rope_reference(x, pos, cos, sin, w, 1e-6).float(), max(tol, 3 / 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    # 1100 columns: a full block of 1024 and a ragged one; a strided view as the model passes
    x = (torch.randn(3, 2300, generator=gen) * 1.5).to(DEVICE, dtype)[:, :2200]
    # |y| < 32: 2 ulp at 16 (float32 2^-19 each; the GPU's exp rounds differently from torch's)
    tol = 2 * 2.0**-19 if dtype == torch.float32 else 2 / 8
    assert swiglu_reference(x).abs().max().item() < 32
    assert_close(swiglu(x).float(), swiglu_reference(x).float(), tol)


# ---- the whole model on the Triton backend -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> tuple[random_model.RandomModel, object]:
    pytest.importorskip("transformers")
    built = random_model.build("tiny", seed=0)
    return built, random_model.hf_model(built)


def logits_seq(
    tokens: list[int], pages: list[int], ctx: int, mask: np.ndarray | None = None
) -> SequenceForward:
    s = seq(len(tokens), ctx, pages, mask)
    s.tokens = tokens
    s.outputs = [(i, RawLogits()) for i in range(len(tokens))]
    return s


def test_engine_on_triton_matches_hf(tiny: tuple[random_model.RandomModel, object]) -> None:
    """The CUDA path (fused model, Triton attention) in float32 against HF: prefill, paged
    decode, two forks on shared pages and a tree mask."""
    built, hf = tiny
    model = FusedLlamaModel(built.config, built.weights, DEVICE, torch.float32)
    engine = random_model.make_engine(
        model, num_pages=16, page_size=PAGE, attention=TritonAttention(SMALL)
    )
    toks = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2)).tolist()

    def hf_logits(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([tokens])).logits[0].float()  # type: ignore[operator]

    prefix = toks[:35]  # two full pages + 3 slots, shared by both forks
    first = engine.forward_logits(ForwardBatch([logits_seq(prefix, [3, 4, 5], 0)]))
    assert_close(first.cpu(), hf_logits(prefix), 1e-3)
    engine.copy_pages([(5, 6, 3), (5, 7, 3)])
    a, b = toks[35:37], toks[37:40]
    # one step: fork a appends 2 tokens, fork b 3 tokens as two sibling branches of a tree mask
    # (b[1] and b[2] both follow b[0]), and a third sequence decodes after its own prefill
    tree = np.concatenate([np.ones((3, 35), dtype=bool), np.tril(np.ones((3, 3), dtype=bool))], 1)
    tree[2, 36] = False
    fork_b = logits_seq(b, [3, 4, 7], 35, tree)
    fork_b.positions = [35, 36, 36]
    engine.forward_logits(ForwardBatch([logits_seq(toks[:20], [9, 10], 0)]))
    out = engine.forward_logits(
        ForwardBatch([logits_seq(a, [3, 4, 6], 35), fork_b, logits_seq(toks[20:21], [9, 10], 20)])
    ).cpu()
    assert_close(out[:2], hf_logits(prefix + a)[35:], 1e-3)
    assert_close(out[2:4], hf_logits(prefix + b[:2])[35:], 1e-3)
    assert_close(out[4], hf_logits([*prefix, b[0], b[2]])[-1], 1e-3)
    assert_close(out[5], hf_logits(toks[:21])[-1], 1e-3)


def test_fused_qwen3_matches_hf() -> None:
    """Qwen3's q/k head norm folded into the RoPE kernel, tied embeddings: prefill and decode
    against HF in float32."""
    pytest.importorskip("transformers")
    built = random_model.build("tiny-qwen3", seed=1)
    hf = random_model.hf_model(built)
    toks = torch.randint(0, 256, (22,), generator=torch.Generator().manual_seed(5)).tolist()
    model = FusedLlamaModel(built.config, built.weights, DEVICE, torch.float32)
    engine = random_model.make_engine(
        model, num_pages=8, page_size=PAGE, attention=TritonAttention(SMALL)
    )
    steps = [engine.forward_logits(ForwardBatch([logits_seq(toks[:20], [6, 2], 0)]))]
    for i in (20, 21):
        steps.append(engine.forward_logits(ForwardBatch([decode_seq(toks[i], [6, 2], i)])))
    with torch.no_grad():
        ref = hf(torch.tensor([toks])).logits[0].float()  # type: ignore[operator]
    assert_close(torch.cat(steps).cpu(), ref, 1e-3)


def test_decode_graph_buffers_pad_and_match_eager(
    tiny: tuple[random_model.RandomModel, object],
) -> None:
    """The padded static-buffer path of DecodeGraphs (run eagerly here) equals a plain step,
    and its padding rows write no KV."""
    built, _ = tiny
    model = FusedLlamaModel(built.config, built.weights, DEVICE, torch.float32)
    eager = random_model.make_engine(
        model, num_pages=16, page_size=PAGE, attention=TritonAttention(SMALL)
    )
    toks = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = [([1, 2], toks[:17]), ([3], toks[17:30]), ([4, 5, 6], toks[30:60])]
    eager.forward_logits(ForwardBatch([logits_seq(t, p, 0) for p, t in prompts]))
    graphed = random_model.make_engine(
        model, num_pages=16, page_size=PAGE, attention=TritonAttention(SMALL)
    )
    graphed.kv_cache.copy_(eager.kv_cache)
    split = KernelConfig(block_m=16, block_n=16, target_programs=64, split_min_slots=16)
    graphs = DecodeGraphs(
        model, graphed.kv_cache, graphed.attention, PAGE,
        batch_sizes=(1, 4), kernel_config=split, capture=False,
    )  # fmt: skip
    step = ForwardBatch(
        [decode_seq(toks[i], p, len(t)) for i, (p, t) in zip((5, 6, 7), prompts, strict=True)]
    )
    assert graphs.metas[4].num_splits is not None and graphs.metas[4].num_splits > 1
    got = graphs.forward_logits(step)
    want = eager.forward_logits(step)
    assert got is not None and got.shape == want.shape == (3, 256)
    assert_close(got.cpu(), want.cpu(), 1e-4)
    # same K/V up to matmul blocking (4 rows vs 3); page 0, which no sequence uses, untouched
    assert_close(graphed.kv_cache, eager.kv_cache, 1e-5)
    assert graphed.kv_cache[:, :, 0].abs().max().item() == 0
    assert graphs.small[0, 3].item() == -1 and graphs.small[1, 3].item() == 0
    prefill = ForwardBatch([logits_seq(toks[:2], [8], 0)])
    assert graphs.forward_logits(prefill) is None  # not a plain decode: runs eagerly


def decode_seq(token: int, pages: list[int], ctx: int) -> SequenceForward:
    return SequenceForward([token], [ctx], pages, ctx, outputs=[(0, RawLogits())])


def test_bucket_choice() -> None:
    assert [bucket_for(n, DEFAULT_BATCH_SIZES) for n in (1, 3, 8, 9, 200, 256)] == [
        1,
        4,
        8,
        16,
        256,
        256,
    ]
    assert bucket_for(257, DEFAULT_BATCH_SIZES) is None and bucket_for(0, (1, 2)) is None


# ---- the real compiler ---------------------------------------------------------------------------
def test_kernels_compile_for_sm90() -> None:
    """The interpreter accepts code the GPU compiler rejects (e.g. a non-constexpr global):
    compile every variant to an sm_90 cubin with Triton's bundled ptxas, in a clean process,
    for the Llama 8B and SmolLM2 shapes."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shapes = ["32,8,128,4096", "9,3,64,576"]
    done = subprocess.run(
        [sys.executable, "-m", "pie.engine.cuda.compile_check", "--arch", "90",
         *(arg for shape in shapes for arg in ("--shape", shape))],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"compiled {14 * len(shapes)} variants for sm_90; 0 spill" in done.stdout
