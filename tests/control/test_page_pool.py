"""PagePool: exact page ids and order on a tiny pool, refcounts, quota, and rejected releases."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from pie.control import (
    IntegrityError,
    InvalidRequestError,
    NotOwnerError,
    PagePool,
    PoolExhaustedError,
    QuotaExceededError,
    UnknownPageError,
)


@pytest.fixture
def pool(checked: Callable[[PagePool], PagePool]) -> PagePool:
    return checked(PagePool(8))


def snapshot(pool: PagePool) -> tuple[object, ...]:
    refs = tuple(pool.refcount(p) for p in range(pool.num_pages))
    return pool.free_count, pool.owned(1), pool.owned(2), refs


def test_allocate_takes_free_pages_in_queue_order(pool: PagePool) -> None:
    assert pool.allocate(1, 3) == [0, 1, 2]
    assert pool.allocate(2, 2) == [3, 4]
    assert pool.release(1, [1]) == [1]
    # a freed page joins the back of the free queue: reused last
    assert pool.allocate(2, 4) == [5, 6, 7, 1]
    assert pool.free_count == 0 and pool.used_count == 8
    assert pool.owned(1) == {0: 1, 2: 1}
    assert pool.owned(2) == {3: 1, 4: 1, 5: 1, 6: 1, 7: 1, 1: 1}
    assert pool.allocate(1, 0) == []


def test_shared_page_is_freed_by_its_last_holder(pool: PagePool) -> None:
    assert pool.allocate(1, 2) == [0, 1]
    pool.retain(2, [0, 1])
    assert [pool.refcount(0), pool.refcount(1)] == [2, 2]
    assert pool.release(1, [0, 1]) == []
    assert [pool.refcount(0), pool.refcount(1)] == [1, 1]
    assert pool.free_count == 6
    assert pool.release(2, [1]) == [1]
    assert pool.release(2, [0]) == [0]
    assert pool.allocate(3, 8) == [2, 3, 4, 5, 6, 7, 1, 0]


def test_one_owner_may_hold_several_references(pool: PagePool) -> None:
    pool.allocate(1, 1)
    pool.retain(1, [0])
    assert pool.owned(1) == {0: 2} and pool.refcount(0) == 2
    assert pool.release(1, [0, 0]) == [0]
    assert pool.free_count == 8


def test_exhaustion_allocates_nothing(pool: PagePool) -> None:
    pool.allocate(1, 6)
    with pytest.raises(PoolExhaustedError, match="2 of 8 pages free, 3 requested"):
        pool.allocate(2, 3)
    assert pool.free_count == 2 and pool.owned(2) == {}
    assert pool.allocate(2, 2) == [6, 7]


def test_quota_counts_every_page_held(pool: PagePool) -> None:
    pool.set_quota(1, 3)
    assert pool.allocate(1, 2) == [0, 1]
    with pytest.raises(QuotaExceededError, match="holds 2 pages of its quota of 3"):
        pool.allocate(1, 2)
    assert pool.owned(1) == {0: 1, 1: 1} and pool.free_count == 6
    foreign = pool.allocate(2, 2)  # [2, 3]
    pool.retain(1, [foreign[0]])  # an imported page counts: 3 of 3
    with pytest.raises(QuotaExceededError):
        pool.retain(1, [foreign[1]])
    assert pool.refcount(foreign[1]) == 1
    pool.retain(1, [0])  # another reference on a page it holds costs nothing
    pool.set_quota(1, None)
    assert pool.allocate(1, 1) == [4]


@pytest.mark.parametrize(
    ("pages", "error"),
    [
        ([2], NotOwnerError),  # foreign: owner 2's page
        ([5], UnknownPageError),  # free: never allocated
        ([8], UnknownPageError),  # out of range
        ([-1], UnknownPageError),
        ([0, 0], NotOwnerError),  # more releases than references held
        ([0, 2], NotOwnerError),  # one bad id spoils the whole call
        ([1, 6], UnknownPageError),
    ],
)
def test_bad_release_raises_and_changes_nothing(
    pool: PagePool, pages: list[int], error: type[Exception]
) -> None:
    pool.allocate(1, 2)
    pool.allocate(2, 1)
    before = snapshot(pool)
    with pytest.raises(error):
        pool.release(1, pages)
    assert snapshot(pool) == before


def test_double_free_raises_and_changes_nothing(pool: PagePool) -> None:
    pool.allocate(1, 2)
    pool.release(1, [0])
    before = snapshot(pool)
    with pytest.raises(UnknownPageError, match="page 0 is free"):
        pool.release(1, [0])
    assert snapshot(pool) == before
    pool.retain(2, [1])
    pool.release(1, [1])
    with pytest.raises(NotOwnerError):  # page 1 still lives (owner 2), but not for owner 1
        pool.release(1, [1])


def test_retain_of_free_page_changes_nothing(pool: PagePool) -> None:
    pool.allocate(1, 1)
    before = snapshot(pool)
    with pytest.raises(UnknownPageError):
        pool.retain(2, [0, 3])
    assert snapshot(pool) == before


def test_release_owner_returns_everything(pool: PagePool) -> None:
    pool.allocate(1, 3)
    pool.retain(1, [0])
    pool.retain(2, [1])
    assert pool.release_owner(1) == 2  # page 1 lives on with owner 2
    assert pool.owned(1) == {} and pool.refcount(1) == 1 and pool.free_count == 7
    assert pool.release_owner(1) == 0


def test_negative_counts_are_rejected(pool: PagePool) -> None:
    with pytest.raises(InvalidRequestError):
        pool.allocate(1, -1)
    with pytest.raises(InvalidRequestError):
        pool.set_quota(1, -1)


def test_check_integrity_detects_corruption(pool: PagePool) -> None:
    pool.allocate(1, 2)
    pool._refs[0] += 1  # simulate a bug: a reference nobody holds
    with pytest.raises(IntegrityError, match="page 0"):
        pool.check_integrity()
    pool._refs[0] -= 1
    pool._free.append(5)  # a page twice in the free queue
    with pytest.raises(IntegrityError, match="twice"):
        pool.check_integrity()
    pool._free.pop()


def test_concurrent_allocate_release_keeps_the_pool_whole(pool: PagePool) -> None:
    def churn(owner: int) -> None:
        for _ in range(300):
            try:
                pages = pool.allocate(owner, 2)
            except PoolExhaustedError:
                continue
            pool.retain(owner + 100, pages[:1])
            pool.release(owner, pages)
            pool.release(owner + 100, pages[:1])

    threads = [threading.Thread(target=churn, args=(owner,)) for owner in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.free_count == 8
