"""BatchScheduler over a FakeEngine whose KV store holds token ids.

Timing is controlled, never slept on: work is queued before start(), or the engine is held
inside a step (an Event) while more work arrives. RawLogits outputs return the tokens a position
attends to, so each test checks what every sequence really reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import cast

import numpy as np
import pytest
from fake_engine import Stack

from pie.control import (
    ControlError,
    ForwardCancelledError,
    ForwardRequest,
    InvalidRequestError,
    KvContext,
    SchedulerStoppedError,
)
from pie.engine.errors import InvalidBatchError
from pie.engine.request import Greedy, LogitsResult, RawLogits, SampleResult, TokenResult

Results = Future[list[SampleResult]]


def submit(stack: Stack, ctx: KvContext, tokens: list[int], **kwargs: object) -> Results:
    """A forward whose one output is what its last token sees."""
    kwargs.setdefault("outputs", [(len(tokens) - 1, RawLogits())])
    return stack.scheduler.submit(ForwardRequest(ctx, tokens, **kwargs))  # type: ignore[arg-type]


def visible(result: SampleResult) -> list[int]:
    """The tokens a RawLogits output attended to (the fake engine's answer)."""
    assert isinstance(result, LogitsResult)
    return list(cast(tuple[int, ...], result.logits))


def seen(future: Results) -> list[int]:
    return visible(future.result(timeout=10)[0])


def test_lone_request_runs_at_once(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.scheduler.start()
    ctx = stack.contexts.create(1)
    future = submit(stack, ctx, [5, 6, 7], outputs=[(2, Greedy()), (0, RawLogits())])
    assert future.result(timeout=10) == [TokenResult(8), ((5,),)]
    assert [len(b.sequences) for b in stack.engine.batches] == [1]
    assert stack.scheduler.stats.steps == 1


def test_requests_arriving_during_a_step_are_batched(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    a, b, c = (stack.contexts.create(owner) for owner in (1, 2, 3))
    stack.scheduler.start()
    stack.engine.hold()
    fa = submit(stack, a, [1, 2])
    assert stack.engine.wait_step().sequences[0].tokens == [1, 2]  # a runs alone, held
    fb, fc = submit(stack, b, [3]), submit(stack, c, [4, 5])
    stack.engine.release()
    assert (seen(fa), seen(fb), seen(fc)) == ([1, 2], [3], [4, 5])
    assert [[s.tokens for s in b.sequences] for b in stack.engine.batches] == [
        [[1, 2]],
        [[3], [4, 5]],
    ]


def test_long_prefill_is_chunked_and_never_stalls_decodes(make_stack: Callable[..., Stack]) -> None:
    # The brief's case: a 4000-token prefill and 20 decoders, 512 tokens per step.
    # Token budget only: pacing by time (below) would cut the chunks to the measured pace.
    stack = make_stack(
        num_pages=512, page_size=16, max_batch_tokens=512, decode_latency_factor=None
    )
    prompt = [t % 1000 for t in range(4000)]
    prefill = submit(
        stack,
        stack.contexts.create(0),
        prompt,
        outputs=[(3999, Greedy()), (100, RawLogits())],  # results follow this order
    )
    decoders = [stack.contexts.create(d) for d in range(1, 21)]
    chains = {
        d: [submit(stack, ctx, [d * 10 + k]) for k in range(10)] for d, ctx in enumerate(decoders)
    }
    stack.scheduler.start()
    assert prefill.result(timeout=10) == [TokenResult(0), (tuple(prompt[:101]),)]
    for d, futures in chains.items():
        for k, future in enumerate(futures):
            assert seen(future) == [d * 10 + j for j in range(k + 1)]
    steps = stack.engine.batches
    chunks = [len(s.tokens) for b in steps for s in b.sequences if len(s.tokens) > 1]
    assert chunks == [492] * 8 + [64]  # 512 minus the 20 decodes, until the prompt is done
    for batch in steps[:9]:
        assert sum(len(s.tokens) for s in batch.sequences) <= 512
        assert sum(len(s.tokens) == 1 for s in batch.sequences) == 20  # every decoder, every step
    assert stack.scheduler.stats.queue_depth == 0


def test_one_chunk_per_context_and_order_kept(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    a, b = stack.contexts.create(1), stack.contexts.create(2)
    fa = [submit(stack, a, [t]) for t in (1, 2, 3)]
    fb = submit(stack, b, [9])
    stack.scheduler.start()
    assert [seen(f) for f in fa] == [[1], [1, 2], [1, 2, 3]]
    assert seen(fb) == [9]
    assert [[s.tokens for s in b.sequences] for b in stack.engine.batches] == [
        [[1], [9]],
        [[2]],
        [[3]],
    ]


def test_chunks_of_one_forward_run_in_order(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(max_batch_tokens=4, decode_tokens=1)
    ctx = stack.contexts.create(1)
    first = submit(stack, ctx, list(range(10)), outputs=[(9, RawLogits()), (3, Greedy())])
    then = submit(stack, ctx, [50, 51])
    stack.scheduler.start()
    assert first.result(timeout=10) == [(tuple(range(10)),), TokenResult(4)]
    assert seen(then) == [*range(10), 50, 51]
    assert [b.sequences[0].context_len for b in stack.engine.batches] == [0, 4, 8, 10]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tokens": [1000]}, InvalidBatchError),  # outside the vocabulary (engine's check)
        ({"tokens": [1], "positions": [8192]}, InvalidBatchError),
        ({"tokens": []}, InvalidRequestError),
        ({"tokens": [1, 2], "positions": [0]}, InvalidRequestError),
        ({"tokens": [1], "outputs": [(1, Greedy())]}, InvalidRequestError),
        ({"tokens": [1], "attention_mask": np.ones((1, 3), dtype=bool)}, InvalidRequestError),
        ({"tokens": [1], "attention_mask": np.ones((1, 3), dtype=int)}, InvalidRequestError),
    ],
)
def test_bad_request_fails_alone(
    make_stack: Callable[..., Stack], kwargs: dict[str, object], error: type[Exception]
) -> None:
    stack = make_stack()
    good1, bad, good2 = (stack.contexts.create(owner) for owner in (1, 2, 3))
    submit(stack, bad, [7])
    f1 = submit(stack, good1, [1])
    kwargs.setdefault("outputs", [])
    fbad = stack.scheduler.submit(ForwardRequest(bad, **kwargs))  # type: ignore[arg-type]
    f2 = submit(stack, good2, [2])
    with pytest.raises(error):
        fbad.result(timeout=0)  # rejected at submit, before anything ran
    assert bad.length == 1  # its slots were given back
    stack.scheduler.start()
    assert (seen(f1), seen(f2)) == ([1], [2])
    assert len(stack.engine.batches) == 1 and len(stack.engine.batches[0].sequences) == 3


def test_engine_error_fails_only_its_batch(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(poison=666)
    x, b, c, d = (stack.contexts.create(owner) for owner in (1, 2, 3, 4))
    stack.scheduler.start()
    stack.engine.hold()
    fx = submit(stack, x, [1])
    stack.engine.wait_step()
    fb, fc = submit(stack, b, [666]), submit(stack, c, [3])
    stack.engine.release()
    assert seen(fx) == [1]
    for future in (fb, fc):
        with pytest.raises(RuntimeError, match="poisoned"):
            future.result(timeout=10)
    assert seen(submit(stack, d, [4])) == [4]  # the loop keeps running
    assert stack.scheduler.stats.forwards == 2


def test_cancel_owner_fails_queued_and_waits_for_running(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    mine, mine2, theirs = (stack.contexts.create(owner) for owner in (1, 1, 2))
    stack.scheduler.start()
    stack.engine.hold()
    running = submit(stack, mine, [1])
    stack.engine.wait_step()
    queued, other = submit(stack, mine2, [2]), submit(stack, theirs, [3])
    cancelled: list[int] = []
    canceller = threading.Thread(target=lambda: cancelled.append(stack.scheduler.cancel_owner(1)))
    canceller.start()
    with pytest.raises(ForwardCancelledError):
        queued.result(timeout=10)
    assert canceller.is_alive()  # owner 1 still has a forward inside the held step
    stack.engine.release()
    canceller.join(timeout=10)
    assert cancelled == [1]
    assert seen(running) == [1] and seen(other) == [3]
    assert stack.contexts.close_owner(1) == 2


def test_stop_fails_pending_futures(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    a, b = stack.contexts.create(1), stack.contexts.create(2)
    stack.scheduler.start()
    stack.engine.hold()
    running = submit(stack, a, [1])
    stack.engine.wait_step()
    pending = submit(stack, b, [2])
    stopper = threading.Thread(target=stack.scheduler.stop)
    stopper.start()
    with pytest.raises(SchedulerStoppedError):
        pending.result(timeout=10)
    stack.engine.release()
    stopper.join(timeout=10)
    assert seen(running) == [1]  # the step already inside the engine finishes
    with pytest.raises(SchedulerStoppedError):
        submit(stack, a, [3]).result(timeout=0)
    with pytest.raises(SchedulerStoppedError):
        stack.scheduler.start()


def test_stats_report_mean_batch_size(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    ctxs = [stack.contexts.create(owner) for owner in range(3)]
    futures = [submit(stack, ctx, [1]) for ctx in ctxs] + [submit(stack, ctxs[0], [2, 3])]
    stack.scheduler.start()
    for future in futures:
        future.result(timeout=10)
    stats = stack.scheduler.stats
    assert (stats.steps, stats.forwards, stats.tokens, stats.queue_depth) == (2, 4, 5, 0)
    assert stats.mean_sequences_per_step == 2.0 and stats.mean_tokens_per_step == 2.5


def test_forks_see_the_prefix_and_their_own_tokens(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.scheduler.start()
    parent = stack.contexts.create(1)
    submit(stack, parent, [1, 2, 3, 4, 5, 6])  # fork waits for it to run
    children = [stack.contexts.fork(parent) for _ in range(3)]
    futures = [submit(stack, child, [100 + i]) for i, child in enumerate(children)]
    mine = submit(stack, parent, [50])
    assert [seen(f) for f in futures] == [[1, 2, 3, 4, 5, 6, 100 + i] for i in range(3)]
    assert seen(mine) == [1, 2, 3, 4, 5, 6, 50]
    # three children copied the shared partial page; the parent then wrote it in place
    assert [(src, n) for src, _, n in stack.engine.copies] == [(1, 2)] * 3
    for ctx in [*children, parent]:
        stack.contexts.close(ctx)
    assert stack.pool.free_count == 32


def test_hidden_slots_and_request_masks_combine(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.scheduler.start()
    ctx = stack.contexts.create(1)
    submit(stack, ctx, [1, 2, 3, 4, 5, 6]).result(timeout=10)
    stack.contexts.mask(ctx, 1, 3, True)
    assert seen(submit(stack, ctx, [7])) == [1, 4, 5, 6, 7]
    own = np.ones((1, 8), dtype=bool)
    own[0, 5] = False  # the request hides slot 5 itself; slots 1, 2 stay hidden by the context
    assert seen(submit(stack, ctx, [8], attention_mask=own)) == [1, 4, 5, 7, 8]


def test_lookahead_masks_are_never_split(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(max_batch_tokens=8, decode_tokens=1)
    ctx = stack.contexts.create(1)
    both_ways = np.ones((6, 6), dtype=bool)  # every token sees every other: not causal
    whole = submit(
        stack, ctx, [1, 2, 3, 4, 5, 6], attention_mask=both_ways, outputs=[(0, RawLogits())]
    )
    other = stack.contexts.create(2)
    split = submit(stack, other, list(range(10)))
    too_long = submit(
        stack, stack.contexts.create(3), list(range(9)), attention_mask=np.ones((9, 9), dtype=bool)
    )
    with pytest.raises(InvalidRequestError, match="cannot be split"):
        too_long.result(timeout=0)
    stack.scheduler.start()
    assert seen(whole) == [1, 2, 3, 4, 5, 6]  # token 0 saw the later ones: same step
    assert seen(split) == list(range(10))
    assert [[len(s.tokens) for s in b.sequences] for b in stack.engine.batches] == [[6, 2], [8]]


def test_fork_waits_for_forwards_in_flight(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.scheduler.start()
    ctx = stack.contexts.create(1)
    stack.engine.hold()
    running = submit(stack, ctx, [1, 2])
    stack.engine.wait_step()
    forks: list[KvContext] = []
    forker = threading.Thread(target=lambda: forks.append(stack.contexts.fork(ctx)))
    forker.start()
    assert forker.is_alive()  # cannot share pages while they are being written
    stack.engine.release()
    forker.join(timeout=10)
    assert seen(running) == [1, 2] and forks[0].length == 2


def test_submit_needs_a_context_manager_and_wait_idle_a_thread(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    ctx = stack.contexts.create(1)
    submit(stack, ctx, [1])
    with pytest.raises(ControlError, match="start"):
        stack.scheduler.wait_idle(ctx)


def test_fifty_threads_of_decodes_stay_consistent(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(num_pages=512, max_batch_tokens=64)
    stack.scheduler.start()
    stack.engine.hold()  # the first prompts gather while the engine is held...
    prompts_in = threading.Barrier(51, timeout=10)
    errors: list[BaseException] = []

    def inferlet(owner: int) -> None:
        try:
            ctx = stack.contexts.create(owner)
            history = [owner, owner + 1, owner + 2]
            out = stack.scheduler.submit(
                ForwardRequest(ctx, list(history), outputs=[(2, Greedy())])
            )
            prompts_in.wait()
            token = out.result(timeout=10)[0].token_id  # type: ignore[union-attr]
            for step in range(12):
                if step == 6 and owner % 2 == 0:  # even owners continue on a fork
                    child = stack.contexts.fork(ctx)
                    stack.contexts.close(ctx)
                    ctx = child
                history.append(token)
                future = submit(stack, ctx, [token], outputs=[(0, RawLogits()), (0, Greedy())])
                view, sampled = future.result(timeout=10)
                assert visible(view) == history
                token = sampled.token_id  # type: ignore[union-attr]
                assert token == (history[-1] + 1) % 1000
            stack.contexts.close(ctx)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=inferlet, args=(owner,)) for owner in range(50)]
    for t in threads:
        t.start()
    prompts_in.wait()
    stack.engine.release()  # ...so at least one step carries several of them
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert stack.pool.free_count == 512
    stats = stack.scheduler.stats
    assert stats.forwards == 50 * 13 and stats.mean_sequences_per_step > 1


# ---- gathering answered decoders into one step ------------------------------------------------
def decode(stack: Stack, ctx: KvContext, steps: int) -> threading.Thread:
    """A decoder on its own thread: each forward is sent as soon as the previous one resolved."""

    def loop() -> None:
        token = ctx.owner
        for _ in range(steps):
            future = submit(stack, ctx, [token], outputs=[(0, Greedy())])
            token = future.result(timeout=10)[0].token_id  # type: ignore[union-attr]

    thread = threading.Thread(target=loop)
    thread.start()
    return thread


def step_sizes(stack: Stack) -> list[int]:
    return [len(b.sequences) for b in stack.engine.batches]


@pytest.mark.parametrize(("gap", "sizes"), [(0.0, [1, 3] * 5 + [1, 3]), (5.0, [1] + [4] * 5 + [3])])
def test_decoders_split_by_an_idle_engine_merge_again(
    make_stack: Callable[..., Stack], gap: float, sizes: list[int]
) -> None:
    """One decoder finds the engine idle and runs alone; the other three gather meanwhile.

    Without gathering (gap 0) the two groups alternate forever; with it, the step after the
    split waits for the lone decoder to come back and all four stay together.
    """
    stack = make_stack(gather_gap_s=gap)
    stack.engine.step_seconds = 0.1  # far longer than any thread's turnaround
    stack.scheduler.start()
    ctxs = [stack.contexts.create(owner) for owner in range(4)]
    stack.engine.hold()
    threads = [decode(stack, ctxs[0], 6)]
    stack.engine.wait_step()  # decoder 0 runs alone, held
    threads += [decode(stack, ctx, 6) for ctx in ctxs[1:]]
    while stack.scheduler.stats.queue_depth < 3:
        time.sleep(0.001)
    stack.engine.release()
    for thread in threads:
        thread.join(timeout=30)
    assert step_sizes(stack) == sizes


def test_a_lone_decoder_never_waits_to_gather(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(gather_gap_s=5.0)
    stack.engine.step_seconds = 0.02
    stack.scheduler.start()
    decode(stack, stack.contexts.create(1), 10).join(timeout=30)
    stats = stack.scheduler.stats
    assert stats.steps == 10 and stats.gather_seconds < 0.01


def test_a_straggler_delays_a_step_once_and_at_most_the_gap(
    make_stack: Callable[..., Stack],
) -> None:
    """Decoder 1 stops after 2 forwards: the next step waits for it once, for the gap only."""
    stack = make_stack(gather_gap_s=0.03)
    stack.engine.step_seconds = 0.2
    ctxs = [stack.contexts.create(owner) for owner in (1, 2)]
    threads = [decode(stack, ctxs[0], 2), decode(stack, ctxs[1], 8)]
    while stack.scheduler.stats.queue_depth < 2:
        time.sleep(0.001)
    stack.scheduler.start()
    for thread in threads:
        thread.join(timeout=30)
    assert step_sizes(stack) == [2, 2] + [1] * 6
    assert 0.025 < stack.scheduler.stats.gather_seconds < 0.15  # the gap, not a step


def test_a_cancelled_owner_is_not_waited_for(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(gather_gap_s=5.0)
    stack.engine.step_seconds = 0.5  # so the gather bound is 0.5 s
    a, b = stack.contexts.create(1), stack.contexts.create(2)
    fa, fb = submit(stack, a, [1]), submit(stack, b, [2])
    stack.scheduler.start()
    for future in (fa, fb):
        future.result(timeout=10)
    later = submit(stack, b, [3])  # the step now waits for owner 1...
    time.sleep(0.05)
    began = time.monotonic()
    stack.scheduler.cancel_owner(1)  # ...until owner 1 ends
    assert seen(later) == [2, 3]
    assert time.monotonic() - began < 0.9  # one step, not the gather bound on top


# ---- waiting for pages ------------------------------------------------------------------------
def filled(stack: Stack, owner: int, n: int) -> KvContext:
    """A context of `owner` whose `n` tokens have run (n / page_size pages)."""
    ctx = stack.contexts.create(owner)
    assert seen(submit(stack, ctx, list(range(n)))) == list(range(n))
    return ctx


def test_a_forward_short_of_pages_waits_and_runs_when_pages_free(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(num_pages=4, page_size=4)
    stack.scheduler.start()
    hog = filled(stack, 1, 16)  # all four pages
    waiter = stack.contexts.create(2)
    future = submit(stack, waiter, [7, 8])
    time.sleep(0.05)
    assert not future.done() and stack.scheduler.stats.page_waits == 1
    stack.contexts.close(hog)  # its pages come free: the waiter is admitted and runs
    assert seen(future) == [7, 8]
    assert stack.scheduler.stats.page_waits == 0


def test_page_waiters_go_by_priority_then_arrival(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(num_pages=4, page_size=4, max_swapped_pages=0)  # no preemption
    stack.scheduler.start()
    hog = filled(stack, 1, 16)
    stack.scheduler.set_priority(4, 5)
    finished: list[int] = []
    waits = {}
    for owner in (2, 3, 4):  # each needs three of the four pages: one at a time
        ctx = stack.contexts.create(owner)
        future = submit(stack, ctx, list(range(10)))
        future.add_done_callback(lambda _, o=owner: finished.append(o))
        waits[owner] = future, ctx
    time.sleep(0.05)
    assert stack.scheduler.stats.page_waits == 3
    stack.contexts.close(hog)
    for owner in (4, 2, 3):  # each frees its pages for the next (a wrong order times out)
        future, ctx = waits[owner]
        future.result(timeout=10)
        stack.contexts.close(ctx)
    assert finished == [4, 2, 3]  # the high-priority one first, then first come first served


def test_a_newcomer_needing_pages_queues_behind_the_waiters(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(num_pages=4, page_size=4)
    stack.scheduler.start()
    hog = filled(stack, 1, 12)  # three pages, one left
    big = submit(stack, stack.contexts.create(2), list(range(8)))  # two pages: waits
    small = submit(stack, stack.contexts.create(3), [1])  # one page would fit, but queues
    time.sleep(0.05)
    assert not big.done() and not small.done()
    stack.contexts.close(hog)
    assert seen(big) == list(range(8)) and seen(small) == [1]


def test_a_page_wait_ends_in_a_clear_error_at_its_bound(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(num_pages=2, page_size=4, page_wait_s=0.2)
    stack.scheduler.start()
    filled(stack, 1, 8)
    began = time.monotonic()
    future = submit(stack, stack.contexts.create(2), [1])
    with pytest.raises(ControlError, match=r"KV pool exhausted: waited 0\.2 s"):
        future.result(timeout=10)
    assert 0.2 <= time.monotonic() - began < 2.0
    assert stack.scheduler.stats.page_waits == 0


def test_cancelling_an_owner_fails_its_page_waits(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(num_pages=2, page_size=4)
    stack.scheduler.start()
    filled(stack, 1, 8)
    ctx = stack.contexts.create(2)
    future = submit(stack, ctx, [1])
    later = submit(stack, ctx, [2])  # same context: queues behind, in order
    assert stack.scheduler.cancel_owner(2) == 0
    for f in (future, later):
        with pytest.raises(ForwardCancelledError):
            f.result(timeout=10)
    stack.scheduler.wait_idle(ctx)  # nothing of it is counted as pending any more


def test_pages_set_aside_are_kept_for_their_owner(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(num_pages=4, page_size=4, page_wait_s=0)
    stack.scheduler.start()
    stack.pool.set_aside(9, 3)
    assert stack.pool.available(1) == 1 and stack.pool.available(9) == 4
    with pytest.raises(ControlError, match="3 set aside for others"):
        submit(stack, stack.contexts.create(1), list(range(8))).result(timeout=10)
    assert seen(submit(stack, stack.contexts.create(9), list(range(12)))) == list(range(12))
    with pytest.raises(ControlError, match="cannot set aside 2 pages"):
        stack.pool.set_aside(5, 2)  # one page left that is not kept for owner 9
    stack.pool.release_owner(9)
    assert stack.pool.available(1) == 4


# ---- pacing prefill by time -------------------------------------------------------------------
def test_the_pacer_keeps_a_step_with_decodes_within_its_latency_factor() -> None:
    from pie.control.pacing import ACTIVE_S, PROBE_TOKENS, REFRESH_STEPS, PrefillPacer

    # A model of a CPU step: 10 ms for the decoders, 2 ms per prefill token.
    def step(decodes: int, prefill: int) -> float:
        return (0.010 if decodes else 0.001) + 0.002 * prefill

    pacer = PrefillPacer(latency_factor=2.0)
    assert pacer.prefill_tokens(False) is None  # no decoder: the prompt goes at full speed
    assert pacer.prefill_tokens(True) == 0  # no decode-only step measured yet: measure one
    pacer.observe(4, 0, step(4, 0), now=100.0)
    assert pacer.prefill_tokens(True, now=100.0) == PROBE_TOKENS
    pacer.observe(4, PROBE_TOKENS, step(4, PROBE_TOKENS), now=100.0)
    times = []
    for _ in range(REFRESH_STEPS - 1):
        n = pacer.prefill_tokens(True, now=100.0)
        assert n is not None and n > 0
        times.append(step(4, n))
        pacer.observe(4, n, times[-1], now=100.0)
    assert max(times) <= 2.0 * step(4, 0) + 1e-9  # 5 tokens: 20 ms, twice a decode step
    assert pacer.prefill_tokens(True, now=100.0) == 0  # a decode-only step re-measures
    pacer.observe(4, 0, step(4, 0), now=100.0)
    # A decoder between two tokens (none queued) still holds the pace for a while.
    assert pacer.prefill_tokens(False, now=100.0 + ACTIVE_S / 2) == 5
    assert pacer.prefill_tokens(False, now=100.0 + ACTIVE_S) is None
    assert PrefillPacer(latency_factor=None).prefill_tokens(True) is None


def test_a_paced_step_cuts_long_prompts_but_keeps_every_decode(
    make_stack: Callable[..., Stack],
) -> None:
    from pie.control.batching import PendingForward, plan_batch
    from pie.control.forward import build_sequence

    stack = make_stack(num_pages=64, page_size=16)
    waiting = []
    shapes = [(1, 600, True), (2, 1, True), (3, 1, True), (4, 40, False), (5, 100, True)]
    for owner, n, splittable in shapes:
        ctx = stack.contexts.create(owner)
        start, pages = stack.contexts.reserve(ctx, n)
        request = ForwardRequest(ctx, list(range(n)), outputs=[(n - 1, Greedy())])
        built, _ = build_sequence(request, start, pages, None)
        waiting.append(PendingForward(built, ctx, Future(), splittable, [None]))
    chunks = plan_batch(waiting, 512, 256, 16, prefill_tokens=5, long_prompt=512)
    sizes = {c.forward.context.owner: len(c.seq.tokens) for c in chunks}
    # Both decodes; the prompt longer than `long_prompt` cut to the pace; the one that cannot be cut,
    # and the short prompt (one step's delay, once), whole.
    assert sizes == {1: 5, 2: 1, 3: 1, 4: 40, 5: 100}


# ---- preemption -------------------------------------------------------------------------------
def test_a_higher_priority_forward_swaps_lower_ones_out_and_they_come_back_whole(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(num_pages=4, page_size=4)
    stack.scheduler.start()
    low = filled(stack, 1, 12)  # three pages
    stack.scheduler.set_priority(2, 1)
    high = stack.contexts.create(2)
    prompt = list(range(50, 58))  # two pages, one free: the low one's pages go to host memory
    assert seen(submit(stack, high, prompt)) == prompt
    assert low.swapped is not None and stack.scheduler.preempted_pages == 3
    assert stack.contexts.swapped_pages == 3
    stack.contexts.close(high)
    # Its next forward brings it back: new pages, its KV restored before the step.
    assert seen(submit(stack, low, [99])) == [*range(12), 99]
    assert low.swapped is None and stack.contexts.swapped_pages == 0


def test_equal_priorities_wait_and_shared_pages_stay(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(num_pages=4, page_size=4, page_wait_s=0.3)
    stack.scheduler.start()
    low = filled(stack, 1, 8)
    stack.contexts.fork(low)  # both pages now shared: never swapped
    filled(stack, 3, 8)  # the other two pages
    with pytest.raises(ControlError, match="KV pool exhausted"):  # same priority: no preemption
        submit(stack, stack.contexts.create(4), [1]).result(timeout=10)
    stack.scheduler.set_priority(2, 5)
    high = stack.contexts.create(2)
    assert seen(submit(stack, high, [7])) == [7]  # owner 3's pages went out; owner 1's stayed
    assert low.swapped is None and stack.scheduler.preempted_pages == 2


def test_a_program_short_of_its_own_pages_fails_at_once(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(num_pages=4, page_size=4)
    stack.scheduler.start()
    ctx = filled(stack, 1, 12)
    began = time.monotonic()
    with pytest.raises(ControlError, match="KV pool exhausted"):  # nobody else could free any
        submit(stack, ctx, list(range(8))).result(timeout=10)
    assert time.monotonic() - began < 1.0
