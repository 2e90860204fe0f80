"""Bad input raises a typed error and leaves the KV cache untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pie.engine.engine import Engine
from pie.engine.errors import InvalidBatchError
from pie.engine.request import (
    ForwardBatch,
    Greedy,
    LogitsResult,
    LogProbs,
    RawLogits,
    Sample,
    SequenceForward,
    TopKDistribution,
)


def good(**over) -> SequenceForward:  # type: ignore[no-untyped-def]
    fields = dict(
        tokens=[1, 2, 3], positions=[0, 1, 2], page_ids=[5], context_len=0, outputs=[(2, Greedy())]
    )
    fields.update(over)
    return SequenceForward(**fields)  # type: ignore[arg-type]


BAD = {
    "token beyond vocab": dict(tokens=[1, 2, 49152]),
    "negative token": dict(tokens=[1, -1, 3]),
    "position beyond context": dict(positions=[0, 1, 8192]),
    "positions length": dict(positions=[0, 1]),
    "page out of range": dict(page_ids=[256]),
    "negative page": dict(page_ids=[-1]),
    "too few pages": dict(context_len=15, positions=[15, 16, 17]),
    "repeated page": dict(tokens=[1] * 20, positions=list(range(20)), page_ids=[5, 5]),
    "no tokens": dict(tokens=[], positions=[], outputs=[]),
    "output index": dict(outputs=[(3, Greedy())]),
    "mask shape": dict(attention_mask=np.ones((3, 2), dtype=bool)),
    "mask row empty": dict(attention_mask=np.array([[1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=bool)),
    "logit mask all false": dict(logit_mask=np.zeros(49152, dtype=bool)),
    "top-k zero": dict(outputs=[(2, TopKDistribution(k=0))]),
    "negative temperature": dict(outputs=[(2, Sample(temperature=-1.0))]),
    "logprob id": dict(outputs=[(2, LogProbs(token_ids=(49152,)))]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sequence_raises_and_changes_nothing(engine_f32: Engine, case: str) -> None:
    before = engine_f32.kv_cache.clone()
    with pytest.raises(InvalidBatchError):
        engine_f32.execute(ForwardBatch([good(page_ids=[6]), good(**BAD[case])]))
    assert torch.equal(before, engine_f32.kv_cache)


def test_empty_batch(engine_f32: Engine) -> None:
    with pytest.raises(InvalidBatchError, match="empty batch"):
        engine_f32.execute(ForwardBatch([]))


def test_two_sequences_writing_one_slot(engine_f32: Engine) -> None:
    before = engine_f32.kv_cache.clone()
    with pytest.raises(InvalidBatchError, match="same KV slot"):
        engine_f32.execute(ForwardBatch([good(), good()]))
    assert torch.equal(before, engine_f32.kv_cache)


def test_good_batch_runs(engine_f32: Engine) -> None:
    result = engine_f32.execute(ForwardBatch([good(page_ids=[6]), good(page_ids=[7])]))
    assert len(result.outputs) == 2 and all(len(o) == 1 for o in result.outputs)


def test_pages_saved_to_host_memory_come_back_into_other_pages(fresh_cache: Engine) -> None:
    # What a preempted context goes through: its KV saved, its pages reused, then restored
    # into whatever pages are free; the next forward must see the same logits as before.
    prompt = fresh_cache.tokenizer.encode("The capital of France is")
    first = SequenceForward(
        prompt, list(range(len(prompt))), [0], 0, [(len(prompt) - 1, RawLogits())]
    )
    before = fresh_cache.execute(ForwardBatch([first])).outputs[0][0]
    saved = fresh_cache.save_pages([0])
    assert saved.device.type == "cpu"
    fresh_cache.kv_cache.zero_()  # the page is reused by others meanwhile
    fresh_cache.load_pages([5], saved)
    again = SequenceForward(
        [prompt[-1]], [len(prompt) - 1], [5], len(prompt) - 1, [(0, RawLogits())]
    )
    after = fresh_cache.execute(ForwardBatch([again])).outputs[0][0]
    assert isinstance(before, LogitsResult) and isinstance(after, LogitsResult)
    # A one-token forward over restored KV against the prompt's own last position: equal up
    # to the decode and prefill kernels' different sums (float32, the HF check's 1e-3).
    torch.testing.assert_close(
        torch.as_tensor(after.logits), torch.as_tensor(before.logits), atol=1e-3, rtol=0
    )
    with pytest.raises(InvalidBatchError, match="outside the pool"):
        fresh_cache.save_pages([fresh_cache.num_pages])
