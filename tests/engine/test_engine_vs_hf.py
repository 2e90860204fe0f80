"""The engine's logits and greedy tokens against HF transformers on the same GGUF weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pie.engine.engine import Engine
from pie.engine.generate import generate
from pie.engine.request import ForwardBatch, Greedy, RawLogits, SequenceForward

TOL = 1e-3  # float32; eager vs sdpa inside HF differ by < 1e-4 on this model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three colours: red,",
    "Water boils at a temperature of",
]


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def seq(tokens, pages, ctx, outputs=None, positions=None, mask=None) -> SequenceForward:  # type: ignore[no-untyped-def]
    n = len(tokens)
    return SequenceForward(
        tokens=list(tokens),
        positions=list(positions if positions is not None else range(ctx, ctx + n)),
        page_ids=list(pages),
        context_len=ctx,
        outputs=[(i, RawLogits()) for i in (outputs if outputs is not None else range(n))],
        attention_mask=mask,
    )


def run(engine: Engine, *seqs: SequenceForward) -> torch.Tensor:
    return engine.forward_logits(ForwardBatch(list(seqs)))


@pytest.fixture(scope="module")
def prompt_tokens(engine_f32: Engine) -> list[list[int]]:
    return [engine_f32.tokenizer.encode(p) for p in PROMPTS]


def test_prefill_logits_match_hf(fresh_cache: Engine, hf_model, prompt_tokens) -> None:  # type: ignore[no-untyped-def]
    tokens = prompt_tokens[2] * 3  # 3 pages of 16 and a partial one
    ours = run(fresh_cache, seq(tokens, [9, 4, 17, 2], 0))
    assert (ours - hf_logits(hf_model, tokens)).abs().max().item() < TOL


def test_long_prefill_logits_match_hf(fresh_cache: Engine, hf_model, prompt_tokens) -> None:  # type: ignore[no-untyped-def]
    """Past WIDE_MIN_ROWS rows, where AVX-512 CPUs run torch's GEMM and RoPE apart."""
    tokens = (prompt_tokens[2] + prompt_tokens[1]) * 5
    assert len(tokens) >= 100
    pages = list(range(20, 20 + -(-len(tokens) // fresh_cache.page_size)))
    ours = run(fresh_cache, seq(tokens, pages, 0, outputs=range(0, len(tokens), 7)))
    want = hf_logits(hf_model, tokens)[0 : len(tokens) : 7]
    assert (ours - want).abs().max().item() < TOL


def test_page_by_page_decode_matches_hf(fresh_cache: Engine, hf_model, prompt_tokens) -> None:  # type: ignore[no-untyped-def]
    tokens = (prompt_tokens[0] + prompt_tokens[3]) * 2
    pages = [30, 11, 5]
    steps = [run(fresh_cache, seq(tokens[:5], pages, 0, outputs=[4]))]
    for i in range(5, len(tokens)):  # crosses page boundaries one token at a time
        steps.append(run(fresh_cache, seq(tokens[i : i + 1], pages, i)))
    ref = hf_logits(hf_model, tokens)[4:]
    assert (torch.cat(steps) - ref).abs().max().item() < TOL


def test_mixed_prefill_and_decode_batch(fresh_cache: Engine, hf_model, prompt_tokens) -> None:  # type: ignore[no-untyped-def]
    a, b, c = prompt_tokens[0], prompt_tokens[1], prompt_tokens[4]
    run(fresh_cache, seq(a[:-1], [1], 0, outputs=[]), seq(b[:-1], [2, 3], 0, outputs=[]))
    # one step: a decodes, b decodes, c prefills from scratch in two pages
    out = run(
        fresh_cache,
        seq(a[-1:], [1], len(a) - 1),
        seq(c, [7, 8], 0),
        seq(b[-1:], [2, 3], len(b) - 1),
    )
    assert (out[0] - hf_logits(hf_model, a)[-1]).abs().max().item() < TOL
    assert (out[1 : 1 + len(c)] - hf_logits(hf_model, c)).abs().max().item() < TOL
    assert (out[-1] - hf_logits(hf_model, b)[-1]).abs().max().item() < TOL


def test_forks_share_prefix_pages(fresh_cache: Engine, hf_model, prompt_tokens) -> None:  # type: ignore[no-untyped-def]
    prefix = (prompt_tokens[2] * 3)[:35]  # two full pages + 3 slots of a third
    assert len(prefix) == 35
    run(fresh_cache, seq(prefix, [40, 41, 42], 0, outputs=[]))
    # both forks read the shared full pages 40, 41; the partial page 42 is copied for each
    fresh_cache.copy_pages([(42, 50, 3), (42, 51, 3)])
    tail_a, tail_b = prompt_tokens[0][:4], prompt_tokens[4][:6]
    out = run(
        fresh_cache,
        seq(tail_a, [40, 41, 50], len(prefix)),
        seq(tail_b, [40, 41, 51], len(prefix)),
    )
    ref_a = hf_logits(hf_model, prefix + tail_a)[len(prefix) :]
    ref_b = hf_logits(hf_model, prefix + tail_b)[len(prefix) :]
    assert (out[: len(tail_a)] - ref_a).abs().max().item() < TOL
    assert (out[len(tail_a) :] - ref_b).abs().max().item() < TOL


def test_custom_mask_tree_branches(fresh_cache: Engine, hf_model, prompt_tokens) -> None:  # type: ignore[no-untyped-def]
    """Two sibling branches in one forward: each sees the prefix and itself, not the other."""
    prefix = prompt_tokens[3]
    n = len(prefix)
    x, y = prompt_tokens[0][:2], prompt_tokens[4][:3]
    tokens = prefix + x + y
    mask = np.tril(np.ones((len(tokens), len(tokens)), dtype=bool))
    mask[n + len(x) :, n : n + len(x)] = False  # y does not see x
    positions = list(range(n + len(x))) + list(range(n, n + len(y)))
    out = run(fresh_cache, seq(tokens, [3, 4], 0, positions=positions, mask=mask))
    ref_x = hf_logits(hf_model, prefix + x)[n:]
    ref_y = hf_logits(hf_model, prefix + y)[n:]
    assert (out[n : n + len(x)] - ref_x).abs().max().item() < TOL
    assert (out[n + len(x) :] - ref_y).abs().max().item() < TOL


def test_greedy_64_tokens_identical_to_hf(fresh_cache: Engine, hf_model, prompt_tokens) -> None:  # type: ignore[no-untyped-def]
    eos = hf_model.generation_config.eos_token_id
    stops = frozenset([eos] if isinstance(eos, int) else eos or [])
    ours = generate(fresh_cache, prompt_tokens, 64, Greedy(), stops)
    for prompt, got in zip(prompt_tokens, ours, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=64,
                do_sample=False,
            )[0, len(prompt) :].tolist()
        assert got == ref
    assert sum(len(g) for g in ours) > 200  # mostly full-length continuations, not early stops
