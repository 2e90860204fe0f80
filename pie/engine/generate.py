"""Generation driven directly on the engine, with no runtime or control layer in between.

This is the classic serving loop (prefill, then batched decode steps) that `pie generate`, the
benchmarks and the tests use as the baseline an inferlet must match. Pages come from a private
free list; the engine itself never allocates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pie.engine.engine import Engine
from pie.engine.errors import InvalidBatchError
from pie.engine.request import ForwardBatch, Greedy, SamplerSpec, SequenceForward, TokenResult

GREEDY = Greedy()  # frozen dataclass: safe to share as a default


@dataclass(slots=True)
class _Running:
    index: int
    pages: list[int]
    length: int  # KV slots filled
    pending: list[int]  # tokens to feed next step
    output: list[int] = field(default_factory=list)
    done: bool = False


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampler: SamplerSpec | Sequence[SamplerSpec] = GREEDY,
    stop_token_ids: frozenset[int] | set[int] = frozenset(),
    on_token: Callable[[int, int], None] | None = None,
    max_prefill_tokens: int = 2048,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` per prompt; returns the new tokens (stop token included).

    All prompts are admitted at once: prefill in chunks of at most `max_prefill_tokens` tokens
    per step, then every live sequence decodes one token per step in one batch. `sampler` is one
    spec for all prompts or one per prompt. `on_token(prompt_index, token)` sees each token.
    """
    samplers = [sampler] * len(prompts) if not isinstance(sampler, Sequence) else list(sampler)
    if len(samplers) != len(prompts):
        raise ValueError(f"{len(samplers)} samplers for {len(prompts)} prompts")
    # Every check before the first forward: a prompt that cannot fit fails at once, not after
    # its first chunks were computed. The context first: more pages would not help it.
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise InvalidBatchError(f"prompt {i} is empty")
        if len(prompt) + max_new_tokens > engine.max_position:
            raise InvalidBatchError(
                f"prompt {i} is {len(prompt):,} tokens; with {max_new_tokens:,} new ones it needs "
                f"{len(prompt) + max_new_tokens:,}, the model's context is {engine.max_position:,}"
            )
    page_size = engine.page_size
    need = sum(-(-(len(p) + max_new_tokens) // page_size) for p in prompts)
    if need > engine.num_pages:
        raise InvalidBatchError(
            f"{len(prompts)} prompts need {need} KV pages, the engine has {engine.num_pages}"
        )
    free = list(range(engine.num_pages))
    running = []
    for i, prompt in enumerate(prompts):
        n_pages = -(-(len(prompt) + max_new_tokens) // page_size)
        running.append(_Running(i, [free.pop() for _ in range(n_pages)], 0, list(prompt)))

    while True:
        live = [r for r in running if not r.done]
        if not live:
            break
        batch, members, budget = [], [], max_prefill_tokens
        for r in live:
            take = len(r.pending) if len(r.pending) == 1 else min(len(r.pending), budget)
            if take == 0:
                continue
            if len(r.pending) > 1:
                budget -= take
            last_chunk = take == len(r.pending)
            batch.append(
                SequenceForward(
                    tokens=r.pending[:take],
                    positions=list(range(r.length, r.length + take)),
                    page_ids=r.pages,
                    context_len=r.length,
                    outputs=[(take - 1, samplers[r.index])] if last_chunk else [],
                )
            )
            members.append(r)
        result = engine.execute(ForwardBatch(batch))
        for r, seq, outs in zip(members, batch, result.outputs, strict=True):
            r.length += len(seq.tokens)
            r.pending = r.pending[len(seq.tokens) :]
            if not outs:
                continue
            token = outs[0]
            assert isinstance(token, TokenResult)
            r.output.append(token.token_id)
            if on_token is not None:
                on_token(r.index, token.token_id)
            r.done = token.token_id in stop_token_ids or len(r.output) >= max_new_tokens
            r.pending = [token.token_id]
    return [r.output for r in running]
