"""Batch planning: which queued forwards (or chunks of them) go into the next engine step.

Pure functions over the scheduler's FCFS queue, run on the engine thread under its lock. A token
budget per step with chunked prefill keeps a long prompt from stalling decodes.
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import cast

from pie.control.context import KvContext
from pie.engine.request import SampleResult, SequenceForward


@dataclass(slots=True, eq=False)  # eq=False: identity hashing, for sets of forwards
class PendingForward:
    """A submitted forward, from admission until its future is settled."""

    seq: SequenceForward  # the whole forward; pages and hidden slots snapshotted at submit
    context: KvContext
    future: Future[list[SampleResult]]
    splittable: bool  # False for masks that look ahead within the new tokens
    results: list[SampleResult | None]  # per output, in the order of seq.outputs
    done: int = 0  # tokens already handed to the engine
    settled: bool = False  # the future is (being) resolved or failed; the forward is gone

    @property
    def remaining(self) -> int:
        return len(self.seq.tokens) - self.done


@dataclass(slots=True)
class Chunk:
    """Tokens [a, b) of a forward, as one sequence of an engine step."""

    forward: PendingForward
    seq: SequenceForward
    out_slots: list[int]  # which entries of forward.seq.outputs this chunk answers, in order
    last: bool  # the forward's future resolves after this chunk


def plan_batch(
    waiting: list[PendingForward],
    max_tokens: int,
    max_sequences: int,
    decode_tokens: int,
    prefill_tokens: int | None = None,
    long_prompt: int = 0,
) -> list[Chunk]:
    """Pick the next step's chunks from the FCFS queue and advance each picked forward's `done`.

    Only the oldest queued forward of each context is eligible: one chunk per context per step,
    and a context's forwards run in submit order. Pass 1 takes short forwards (at most
    `decode_tokens`: decodes, speculative checks) so a long prefill never stalls them; pass 2
    fills the rest of the budget FCFS, cutting splittable forwards into chunks. Long forwards
    (more than `long_prompt` tokens) take at most `prefill_tokens` of it together, while
    decoders are active, so that step after step stays short enough for them (see
    `PrefillPacer`); shorter ones go at the token budget: they delay the decoders a few steps,
    once, and pacing them too starves throughput. Never empty while `waiting` is not
    (admission keeps unsplittable forwards within `max_tokens`).
    """
    heads: list[PendingForward] = []
    seen: set[KvContext] = set()
    for forward in waiting:
        if forward.context not in seen:
            seen.add(forward.context)
            heads.append(forward)
    take: dict[int, int] = {}  # index into heads -> tokens this step
    budget = max_tokens
    for i, forward in enumerate(heads):
        if len(take) < max_sequences and forward.remaining <= min(decode_tokens, budget):
            take[i] = forward.remaining
            budget -= forward.remaining
    # Long prompts are cut to the pace (one token at least if nothing else runs); a forward
    # that cannot be cut goes whole (waiting for a step without decoders could starve it).
    paced = budget if prefill_tokens is None else min(budget, max(prefill_tokens, int(not take)))
    for i, forward in enumerate(heads):
        if len(take) == max_sequences or budget == 0:
            break
        if i in take:
            continue
        long = len(forward.seq.tokens) > long_prompt
        size = min(forward.remaining, budget, paced if long else budget)
        size = size if forward.splittable else forward.remaining
        if 0 < size <= budget:
            take[i] = size
            budget -= size
            if long:
                paced = max(0, paced - size)
    return [_cut(heads[i], take[i]) for i in sorted(take)]


def _cut(forward: PendingForward, size: int) -> Chunk:
    """The next `size` tokens of `forward` as a chunk; outputs re-indexed into the chunk.

    new tokens:  [ done already | a ......... b | later chunks ]
    slots:         ctx .. ctx+a   ctx+a .. ctx+b-1
    """
    whole = forward.seq
    a, b = forward.done, forward.done + size
    forward.done = b
    last = b == len(whole.tokens)
    if a == 0 and last:
        return Chunk(forward, whole, list(range(len(whole.outputs))), True)
    picked = [(k, i, spec) for k, (i, spec) in enumerate(whole.outputs) if a <= i < b]
    mask = whole.attention_mask
    part = SequenceForward(
        tokens=whole.tokens[a:b],
        positions=whole.positions[a:b],
        page_ids=whole.page_ids,
        context_len=whole.context_len + a,
        outputs=[(i - a, spec) for _, i, spec in picked],
        attention_mask=None if mask is None else mask[a:b, : whole.context_len + b],
        logit_mask=whole.logit_mask,
    )
    return Chunk(forward, part, [k for k, _, _ in picked], last)


def resolve(
    future: Future[list[SampleResult]],
    result: list[SampleResult] | None,
    error: BaseException | None,
) -> None:
    try:
        if error is None:
            future.set_result(cast(list[SampleResult], result))
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass  # the caller cancelled the future: nobody waits for the result
