"""Automatic prefix caching: a later context starts on the pages an earlier one wrote."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fake_engine import Stack

from pie.control import ForwardRequest
from pie.control.prefix_cache import CACHE_OWNER, PrefixCache
from pie.engine.request import LogitsResult, RawLogits

PS = 4


def cached(make_stack: Callable[..., Stack], num_pages: int = 16) -> tuple[Stack, PrefixCache]:
    stack = make_stack(num_pages=num_pages, page_size=PS)
    cache = PrefixCache(stack.pool, PS)
    stack.scheduler.prefix_cache = cache
    stack.pool.reclaim = cache.evict
    stack.scheduler.start()
    return stack, cache


def seen(stack: Stack, owner: int, tokens: list[int], **kw: object) -> list[int]:
    """What the last token attends to, on a fresh context of `owner`."""
    ctx = stack.contexts.create(owner)
    request = ForwardRequest(ctx, tokens, outputs=[(len(tokens) - 1, RawLogits())], **kw)  # type: ignore[arg-type]
    (result,) = stack.scheduler.submit(request).result(timeout=10)
    assert isinstance(result, LogitsResult)
    return list(result.logits)  # type: ignore[arg-type]


def computed(stack: Stack) -> list[int]:
    """Tokens the engine ran in its last step."""
    return [t for seq in stack.engine.batches[-1].sequences for t in seq.tokens]


def test_a_later_prompt_with_the_same_prefix_starts_on_its_pages(
    make_stack: Callable[..., Stack],
) -> None:
    stack, cache = cached(make_stack)
    prompt = list(range(100, 114))  # 14 tokens: three full pages
    assert seen(stack, 1, prompt) == prompt
    assert cache.stats.pages == 3
    other = [*prompt[:12], 7, 8, 9]  # the same first three pages, another ending
    assert seen(stack, 2, other) == other  # attends to the cached slots as if computed
    assert computed(stack) == [7, 8, 9]  # only the new tokens ran
    assert cache.stats.hit_tokens == 12
    # The last token is always computed (it carries the output): a prompt of exactly the
    # cached pages reuses all but its last page.
    assert seen(stack, 3, prompt[:12]) == prompt[:12]
    assert computed(stack) == prompt[8:12]


def test_only_plain_prefixes_are_kept_or_served(make_stack: Callable[..., Stack]) -> None:
    stack, cache = cached(make_stack)
    prompt = list(range(50, 59))
    seen(stack, 1, prompt, positions=[p + 100 for p in range(9)])  # moved positions
    mask = np.tril(np.ones((9, 9), dtype=bool))
    mask[1:, 0] = False  # the others do not see the first token
    seen(stack, 2, prompt, attention_mask=mask)
    assert cache.stats.pages == 0  # neither is what a plain prompt would have written
    seen(stack, 3, prompt)
    assert cache.stats.pages == 2
    moved = seen(stack, 4, prompt, positions=list(range(9)))  # explicit positions: not served
    assert moved == prompt and computed(stack) == prompt


def test_pages_only_the_cache_holds_are_given_back_when_the_pool_runs_short(
    make_stack: Callable[..., Stack],
) -> None:
    stack, cache = cached(make_stack, num_pages=6)
    seen(stack, 1, list(range(21)))  # five full pages go to the cache
    stack.contexts.close_owner(1)
    assert stack.pool.free_count == 1 and cache.reusable() == 5
    assert seen(stack, 2, list(range(200, 222))) == list(range(200, 222))  # needs all six
    assert cache.stats.evicted_pages >= 5
    stack.contexts.close_owner(2)
    cache.clear()
    assert stack.pool.owned(CACHE_OWNER) == {}


def test_a_failed_forward_is_never_offered(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(num_pages=16, page_size=PS, poison=13)
    cache = PrefixCache(stack.pool, PS)
    stack.scheduler.prefix_cache = cache
    stack.scheduler.start()
    ctx = stack.contexts.create(1)
    failed = stack.scheduler.submit(ForwardRequest(ctx, list(range(10, 20))))
    with pytest.raises(RuntimeError, match="poisoned"):
        failed.result(timeout=10)
    ok = stack.scheduler.submit(ForwardRequest(ctx, [1, 2, 3, 4, 5]))
    ok.result(timeout=10)
    assert ctx.tokens is None and cache.stats.pages == 0


def test_a_refused_forward_leaves_its_context_empty(make_stack: Callable[..., Stack]) -> None:
    stack, cache = cached(make_stack)
    prompt = list(range(100, 113))
    seen(stack, 1, prompt)
    ctx = stack.contexts.create(2)
    bad = ForwardRequest(ctx, [*prompt[:12], stack.engine.vocab_size], outputs=[(12, RawLogits())])
    with pytest.raises(Exception, match="vocabulary"):
        stack.scheduler.submit(bad).result(timeout=10)
    assert ctx.length == 0 and ctx.pages == [] and stack.pool.owned(2) == {}
    assert seen(stack, 2, prompt) == prompt  # the same owner starts again, from the cache
    assert cache.stats.hit_tokens == 24  # both times on the cached 12 (the refused one too)
