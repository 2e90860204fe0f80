"""The torch attention backend's per-step metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pie.engine.attention import DECODE_KV_BUCKET, TorchAttention
from pie.engine.request import ForwardBatch, Greedy, SequenceForward

PAGE = 16
CPU = torch.device("cpu")


def decode_batch(rng: np.random.Generator, n: int, masked: bool) -> ForwardBatch:
    seqs = []
    for b in range(n):
        context = int(rng.integers(0, 3 * DECODE_KV_BUCKET))
        pages = rng.permutation(64)[: context // PAGE + 1 + int(rng.integers(0, 3))].tolist()
        mask = None
        if masked and b % 2 == 0:
            mask = rng.random((1, context + 1)) < 0.5
            if b % 4 == 0:
                mask[:] = False  # a row masked whole
        seqs.append(SequenceForward([1], [context], pages, context, [(0, Greedy())], mask))
    return ForwardBatch(seqs)


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n", [1, 5, 33])
def test_decode_metadata_equals_the_general_path(n: int, masked: bool) -> None:
    """An all-decode batch takes a vectorized path; it must build what the general one does."""
    attention = TorchAttention()
    rng = np.random.default_rng(n + 100 * masked)
    for _ in range(5):
        batch = decode_batch(rng, n, masked)
        fast = attention.prepare(batch, PAGE, CPU)
        general = attention._prepare_groups(batch, PAGE, CPU)
        assert fast.num_tokens == general.num_tokens == n
        assert torch.equal(fast.slot_rows, general.slot_rows)
        (f,), (g,) = fast.groups, general.groups
        assert (f.batch, f.q_max, f.kv_len, f.causal) == (g.batch, g.q_max, g.kv_len, g.causal)
        for name in ("token_rows", "query_rows", "kv_rows", "kv_lens", "mask"):
            assert same(getattr(f, name), getattr(g, name)), name


def test_first_token_decodes_are_causal_and_unmasked_rows_attend_all() -> None:
    """Context 0 everywhere: the one new token sees only itself (SDPA's causal case)."""
    seqs = [SequenceForward([1], [0], [b], 0, [(0, Greedy())]) for b in range(3)]
    (group,) = TorchAttention().prepare(ForwardBatch(seqs), PAGE, CPU).groups
    assert group.causal and group.kv_len == DECODE_KV_BUCKET
    assert group.mask is not None and group.mask[:, 0, 0, 0].all()
    assert not group.mask[:, 0, 0, 1:].any()
