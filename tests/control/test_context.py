"""ContextManager: reserve, fork with copy-on-write, truncate, mask, export/import, close.

Page size 4 on an 11-page pool unless said otherwise; copies land in a RecordingSink.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fake_engine import Bench

from pie.control import (
    ContextClosedError,
    InvalidRequestError,
    PoolExhaustedError,
    QuotaExceededError,
)


@pytest.fixture
def bench(make_bench: Callable[..., Bench]) -> Bench:
    return make_bench()


def test_reserve_allocates_pages_as_slots_grow(bench: Bench) -> None:
    ctx = bench.contexts.create(1)
    assert bench.contexts.reserve(ctx, 6) == (0, [0, 1])
    assert bench.contexts.reserve(ctx, 2) == (6, [0, 1])
    assert bench.contexts.reserve(ctx, 1) == (8, [0, 1, 2])
    assert bench.contexts.reserve(ctx, 0) == (9, [0, 1, 2])
    assert ctx.length == 9 and bench.pool.owned(1) == {0: 1, 1: 1, 2: 1}
    assert bench.sink.copies == []


def test_fork_shares_pages_and_copies_the_partial_page_on_first_append(bench: Bench) -> None:
    parent = bench.contexts.create(1)
    bench.contexts.reserve(parent, 6)  # pages [0, 1]; page 1 holds slots 4, 5
    child = bench.contexts.fork(parent)
    assert child.pages == [0, 1] and child.length == 6 and child.owner == 1
    assert [bench.pool.refcount(0), bench.pool.refcount(1)] == [2, 2]
    assert bench.sink.copies == []  # nothing is copied until someone appends

    assert bench.contexts.reserve(child, 1) == (6, [0, 2])
    assert bench.sink.copies == [(1, 2, 2)]  # src page 1, fresh page 2, its 2 filled slots
    assert [bench.pool.refcount(p) for p in (0, 1, 2)] == [2, 1, 1]
    assert bench.contexts.reserve(child, 2) == (7, [0, 2, 3])
    # page 1 is the parent's alone now: it appends in place, no second copy
    assert bench.contexts.reserve(parent, 2) == (6, [0, 1])
    assert bench.sink.copies == [(1, 2, 2)]
    assert bench.sink.idle_waits == [parent.id]


def test_fork_of_page_aligned_context_copies_nothing(bench: Bench) -> None:
    parent = bench.contexts.create(1)
    bench.contexts.reserve(parent, 8)
    child = bench.contexts.fork(parent)
    assert bench.contexts.reserve(child, 1) == (8, [0, 1, 2])
    assert bench.contexts.reserve(parent, 1) == (8, [0, 1, 3])
    assert bench.sink.copies == []
    assert [bench.pool.refcount(p) for p in (0, 1)] == [2, 2]


def test_fork_does_not_share_preallocated_pages(bench: Bench) -> None:
    parent = bench.contexts.create(1)
    bench.contexts.reserve(parent, 5)
    bench.contexts.preallocate(parent, 4)  # capacity for 9 slots, length stays 5
    assert parent.pages == [0, 1, 2] and parent.length == 5
    child = bench.contexts.fork(parent)
    assert child.pages == [0, 1]
    bench.contexts.preallocate(child, 1)  # copy-on-write happens ahead of the forward
    assert child.pages == [0, 3] and bench.sink.copies == [(1, 3, 1)]
    assert bench.contexts.reserve(child, 1) == (5, [0, 3])
    assert bench.contexts.reserve(parent, 4) == (5, [0, 1, 2])


def test_forks_of_a_long_prefix_use_its_pages_once(make_bench: Callable[..., Bench]) -> None:
    bench = make_bench(num_pages=64, page_size=16)
    prefix = bench.contexts.create(1)
    bench.contexts.reserve(prefix, 500)  # 31 full pages + 4 slots in page 31
    forks = [bench.contexts.fork(prefix) for _ in range(10)]
    assert bench.pool.used_count == 32
    assert {bench.pool.refcount(p) for p in prefix.pages} == {11}
    for fork in forks:
        bench.contexts.reserve(fork, 1)
    assert bench.pool.used_count == 42  # one private copy of the partial page per fork
    assert bench.sink.copies == [(31, 32 + i, 4) for i in range(10)]
    assert {bench.pool.refcount(p) for p in prefix.pages[:31]} == {11}
    assert bench.pool.refcount(31) == 1
    for fork in forks:
        bench.contexts.close(fork)
    bench.contexts.close(prefix)
    assert bench.pool.free_count == 64


def test_truncate_frees_pages_past_the_new_length(bench: Bench) -> None:
    ctx = bench.contexts.create(1)
    bench.contexts.reserve(ctx, 10)  # [0, 1, 2]
    bench.contexts.truncate(ctx, 5)
    assert (ctx.pages, ctx.length, bench.pool.free_count) == ([0, 1], 5, 9)
    bench.contexts.truncate(ctx, 4)
    assert ctx.pages == [0] and bench.pool.free_count == 10
    assert bench.contexts.reserve(ctx, 1) == (4, [0, 3])  # freed pages went to the queue's back
    with pytest.raises(InvalidRequestError, match=r"pick a length in \[0, 5\]"):
        bench.contexts.truncate(ctx, 6)
    bench.contexts.truncate(ctx, 0)
    assert ctx.pages == [] and bench.pool.free_count == 11
    assert bench.sink.idle_waits == [ctx.id] * 4


def test_truncate_into_a_shared_page_copies_only_kept_slots(bench: Bench) -> None:
    parent = bench.contexts.create(1)
    bench.contexts.reserve(parent, 8)
    child = bench.contexts.fork(parent)
    bench.contexts.truncate(child, 6)  # page 1 stays shared, 2 of its slots kept
    assert child.pages == [0, 1]
    assert bench.contexts.reserve(child, 1) == (6, [0, 2])
    assert bench.sink.copies == [(1, 2, 2)]


def test_mask_marks_slots(bench: Bench) -> None:
    ctx = bench.contexts.create(1)
    bench.contexts.reserve(ctx, 6)
    assert bench.contexts.hidden_before(ctx, 6) is None
    bench.contexts.mask(ctx, 2, 4, True)
    hidden = bench.contexts.hidden_before(ctx, 6)
    assert hidden is not None and hidden.tolist() == [False, False, True, True, False, False]
    assert bench.contexts.hidden_before(ctx, 2) is None
    child = bench.contexts.fork(ctx)
    bench.contexts.mask(ctx, 3, 4, False)
    assert bench.contexts.hidden_before(ctx, 4).tolist() == [False, False, True, False]  # type: ignore[union-attr]
    assert bench.contexts.hidden_before(child, 4).tolist() == [False, False, True, True]  # type: ignore[union-attr]
    with pytest.raises(InvalidRequestError, match="not inside"):
        bench.contexts.mask(ctx, 5, 7, True)
    bench.contexts.truncate(child, 2)
    bench.contexts.reserve(child, 2)
    assert bench.contexts.hidden_before(child, 4) is None  # truncation forgets the mask


def test_pool_exhausted_in_reserve_changes_nothing(make_bench: Callable[..., Bench]) -> None:
    bench = make_bench(num_pages=4)
    parent = bench.contexts.create(1)
    bench.contexts.reserve(parent, 6)  # [0, 1]
    child = bench.contexts.fork(parent)
    bench.contexts.reserve(bench.contexts.create(2), 8)  # takes [2, 3]: the pool is full
    with pytest.raises(PoolExhaustedError, match="0 of 4 pages free, 1 requested"):
        bench.contexts.reserve(child, 1)  # needs a page for the copy
    assert (child.pages, child.length, bench.pool.refcount(1)) == ([0, 1], 6, 2)
    assert bench.sink.copies == []
    with pytest.raises(PoolExhaustedError):
        bench.contexts.reserve(parent, 7)
    assert (parent.pages, parent.length) == ([0, 1], 6)


def test_quota_exceeded_in_reserve_changes_nothing(bench: Bench) -> None:
    bench.pool.set_quota(1, 2)
    ctx = bench.contexts.create(1)
    bench.contexts.reserve(ctx, 7)
    with pytest.raises(QuotaExceededError):
        bench.contexts.reserve(ctx, 2)
    assert (ctx.pages, ctx.length) == ([0, 1], 7)


def test_unreserve_rolls_back_only_the_latest_reservation(bench: Bench) -> None:
    ctx = bench.contexts.create(1)
    start, _ = bench.contexts.reserve(ctx, 5)
    bench.contexts.unreserve(ctx, start, 5)
    assert ctx.length == 0 and ctx.pages == [0, 1]  # the pages stay as capacity
    bench.contexts.reserve(ctx, 3)
    bench.contexts.unreserve(ctx, 0, 2)  # not the latest: ignored
    assert ctx.length == 3


def test_close_releases_pages_and_ends_the_context(bench: Bench) -> None:
    ctx = bench.contexts.create(1)
    bench.contexts.reserve(ctx, 9)
    bench.contexts.close(ctx)
    assert ctx.closed and bench.pool.free_count == 11
    assert bench.contexts.contexts_of(1) == []
    with pytest.raises(ContextClosedError, match="is closed"):
        bench.contexts.reserve(ctx, 1)
    with pytest.raises(ContextClosedError):
        bench.contexts.close(ctx)
    with pytest.raises(ContextClosedError):
        bench.contexts.fork(ctx)


def test_export_import_shares_pages_across_owners(bench: Bench) -> None:
    ctx = bench.contexts.create(1)
    bench.contexts.reserve(ctx, 6)
    bench.contexts.preallocate(ctx, 4)  # [0, 1, 2]; page 2 is past the filled slots
    bench.contexts.export(ctx, "prefix")
    assert bench.exports.get("prefix").pages == (0, 1)
    bench.contexts.close(ctx)
    assert bench.pool.used_count == 2
    imported = bench.contexts.import_(2, "prefix")
    assert (imported.owner, imported.pages, imported.length) == (2, [0, 1], 6)
    # page 2 went back to the free queue's end on close, so the copy lands in page 3
    assert bench.contexts.reserve(imported, 1) == (6, [0, 3])
    assert bench.sink.copies == [(1, 3, 2)]  # the exported page is never written
    assert bench.sink.idle_waits == [ctx.id, ctx.id]


def test_close_owner_drops_every_context(bench: Bench) -> None:
    a = bench.contexts.create(1)
    bench.contexts.reserve(a, 5)
    b = bench.contexts.fork(a)
    other = bench.contexts.create(2)
    bench.contexts.reserve(other, 1)
    assert bench.contexts.close_owner(1) == 2
    assert a.closed and b.closed and not other.closed
    assert bench.pool.used_count == 1
