"""SnapshotStore: named KV snapshots owned by a user, with a TTL, a page quota, and files.

On a bare PagePool with exact page ids and an injected clock (no sleeping); the disk tests use
a stand-in for the engine's file hooks that writes the "KV" as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pie.control import PagePool, QuotaExceededError
from pie.control.errors import InvalidRequestError
from pie.control.snapshot_disk import SnapshotDisk, file_key
from pie.control.snapshots import (
    SNAPSHOT_OWNER,
    SnapshotContent,
    SnapshotError,
    SnapshotNotFoundError,
    SnapshotQuotaError,
    SnapshotSettings,
    SnapshotStore,
    hidden_ranges,
)

CONTENT = SnapshotContent(10, tuple(range(10)), ((2, 4),))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class JsonKv:
    """The engine's file hooks, with a list of ints per page as the saved KV."""

    def __init__(self, model: str = "fake", page_size: int = 4) -> None:
        self.print = {"model": model, "config": "c0", "dtype": "float32", "page_size": page_size}

    def kv_fingerprint(self) -> dict[str, Any]:
        return dict(self.print)

    def write_saved_pages(self, data: Any, path: Path) -> None:
        path.write_text(json.dumps(data))

    def read_saved_pages(self, path: Path) -> Any:
        return json.loads(path.read_text())


@pytest.fixture
def pool(checked: Callable[[PagePool], PagePool]) -> PagePool:
    return checked(PagePool(16))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def store_of(pool: PagePool, clock: Clock, **settings: Any) -> SnapshotStore:
    return SnapshotStore(pool, SnapshotSettings(**settings), clock=clock)


def test_save_shares_pages_and_open_outlives_the_saver(pool: PagePool, clock: Clock) -> None:
    store = store_of(pool, clock)
    pages = pool.allocate(1, 3)
    store.save("ann", "sys", pages, CONTENT)
    assert [pool.refcount(p) for p in pages] == [2, 2, 2]  # shared, not copied
    pool.release(1, pages)  # the saving instance ended
    opened = store.open("ann", "sys", owner=2)
    assert opened.pages == pages and opened.content == CONTENT and opened.restore is None
    assert [pool.refcount(p) for p in pages] == [2, 2, 2]  # the store's and the opener's
    pool.release(2, pages)
    store.delete("ann", "sys")
    assert pool.free_count == 16
    with pytest.raises(SnapshotNotFoundError, match="no snapshot named 'sys'"):
        store.open("ann", "sys", owner=2)


def test_resave_replaces_and_frees_the_old_pages(pool: PagePool, clock: Clock) -> None:
    store = store_of(pool, clock)
    first, second = pool.allocate(1, 2), pool.allocate(1, 1)
    store.save("ann", "sys", first, CONTENT)
    store.save("ann", "sys", second, SnapshotContent(3, None))
    pool.release(1, first + second)
    assert pool.owned(SNAPSHOT_OWNER) == {second[0]: 1}
    assert store.get("ann", "sys").content.tokens is None
    store.clear()
    assert pool.free_count == 16


def test_ttl_expiry_frees_pages_without_sleeping(pool: PagePool, clock: Clock) -> None:
    store = store_of(pool, clock, ttl_s=60.0, max_ttl_s=600.0)
    default, longer = pool.allocate(1, 2), pool.allocate(1, 2)
    store.save("ann", "default", default, CONTENT)
    store.save("ann", "longer", longer, CONTENT, ttl_s=300)
    pool.release(1, default + longer)
    clock.now += 59.0
    assert store.names("ann") == ["default", "longer"]
    clock.now += 1.0  # the default TTL is up
    assert store.names("ann") == ["longer"]
    assert pool.owned(SNAPSHOT_OWNER) == dict.fromkeys(longer, 1)
    with pytest.raises(SnapshotNotFoundError, match="expired"):
        store.open("ann", "default", owner=2)
    clock.now += 240.0
    assert store.expire() == 1
    assert pool.free_count == 16
    with pytest.raises(InvalidRequestError, match="TTL is 1 to 600 seconds, got 601"):
        store.save("ann", "x", [], CONTENT, ttl_s=601)


def test_quota_counts_a_users_pages_and_names_itself(pool: PagePool, clock: Clock) -> None:
    store = store_of(pool, clock, quota_pages=5)
    a, b = pool.allocate(1, 3), pool.allocate(1, 3)
    store.save("ann", "a", a, CONTENT)
    with pytest.raises(
        SnapshotQuotaError, match="keeps 3 in snapshots and the snapshot quota is 5"
    ):
        store.save("ann", "b", b, CONTENT)
    assert pool.owned(SNAPSHOT_OWNER) == dict.fromkeys(a, 1)  # nothing of `b` retained
    store.save("ann", "a", b, CONTENT)  # replacing `a`: its 3 pages are not counted twice
    store.save("bob", "a", a, CONTENT)  # each user has a quota of their own
    assert (store.pages_of("ann"), store.pages_of("bob")) == (3, 3)
    pool.release(1, a + b)
    store.clear()


def test_another_user_cannot_open_see_or_delete(pool: PagePool, clock: Clock) -> None:
    store = store_of(pool, clock)
    pages = pool.allocate(1, 2)
    store.save("ann", "secret", pages, CONTENT)
    assert store.names("bob") == []
    for attempt in (
        lambda: store.open("bob", "secret", owner=2),
        lambda: store.delete("bob", "secret"),
    ):
        with pytest.raises(SnapshotNotFoundError, match="no snapshot named 'secret'"):
            attempt()
    assert pool.owned(2) == {}
    store.save("bob", "secret", pages[:1], SnapshotContent(1, (7,)))  # the same name: his own
    assert store.open("ann", "secret", owner=3).content == CONTENT
    pool.release(3, pages)
    pool.release(1, pages)
    store.clear()


def test_the_opener_quota_applies(pool: PagePool, clock: Clock) -> None:
    store = store_of(pool, clock)
    pages = pool.allocate(1, 3)
    store.save("ann", "sys", pages, CONTENT)
    pool.set_quota(2, 2)
    with pytest.raises(QuotaExceededError):
        store.open("ann", "sys", owner=2)
    pool.release(1, pages)
    store.clear()


def test_disk_round_trip_loads_pages_on_first_open(
    pool: PagePool, clock: Clock, tmp_path: Path
) -> None:
    kv = JsonKv()
    store = SnapshotStore(pool, disk=SnapshotDisk(tmp_path, kv), clock=clock)
    pages = pool.allocate(1, 2)
    saved = [[1, 2, 3, 4], [5, 6, 0, 0]]
    store.save("ann", "sys", pages, CONTENT, read_pages=lambda p: saved if p == pages else None)
    key = file_key("ann", "sys")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.json", f"{key}.kv"]
    header = json.loads((tmp_path / f"{key}.json").read_text())
    assert header["engine"] == kv.print and header["tokens"] == list(range(10))
    assert (header["user"], header["length"], header["pages"]) == ("ann", 10, 2)
    pool.release(1, pages)
    store.clear()  # the process ends: pages back, files stay
    assert pool.free_count == 16

    restarted = SnapshotStore(pool, disk=SnapshotDisk(tmp_path, kv), clock=clock)
    assert restarted.names("ann") == ["sys"] and restarted.names("bob") == []
    loads: list[tuple[list[int], Any]] = []
    opened = restarted.open("ann", "sys", owner=2, load=lambda p, d: loads.append((p, d)))
    assert loads == [(opened.pages, saved)] and opened.content == CONTENT
    again = restarted.open("ann", "sys", owner=3, load=lambda p, d: loads.append((p, d)))
    assert again.pages == opened.pages and len(loads) == 1  # resident now: shared, not reread
    pool.release(2, opened.pages)
    pool.release(3, again.pages)
    restarted.delete("ann", "sys")
    assert list(tmp_path.iterdir()) == [] and pool.free_count == 16


def test_disk_refuses_another_model_and_drops_expired(
    pool: PagePool, clock: Clock, tmp_path: Path
) -> None:
    store = SnapshotStore(pool, disk=SnapshotDisk(tmp_path, JsonKv()), clock=clock)
    pages = pool.allocate(1, 1)
    store.save("ann", "short", pages, CONTENT, ttl_s=10, read_pages=lambda p: [[0]])
    store.save("ann", "long", pages, CONTENT, ttl_s=100, read_pages=lambda p: [[0]])
    pool.release(1, pages)
    store.clear()
    clock.now += 50.0
    other = SnapshotStore(pool, disk=SnapshotDisk(tmp_path, JsonKv(page_size=16)), clock=clock)
    assert other.names("ann") == ["long"]
    assert not (tmp_path / f"{file_key('ann', 'short')}.json").exists()  # expired: removed
    with pytest.raises(SnapshotError, match=r"saved for model 'fake' .*page size 4\); this server"):
        other.open("ann", "long", owner=2)
    assert pool.free_count == 16


def test_a_failed_disk_write_keeps_nothing(pool: PagePool, clock: Clock, tmp_path: Path) -> None:
    store = SnapshotStore(pool, disk=SnapshotDisk(tmp_path, JsonKv()), clock=clock)
    pages = pool.allocate(1, 1)

    def broken(p: list[int]) -> Any:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.save("ann", "x", pages, CONTENT, read_pages=broken)
    assert store.names("ann") == [] and pool.refcount(pages[0]) == 1
    assert list(tmp_path.iterdir()) == []
    pool.release(1, pages)


def test_hidden_ranges() -> None:
    assert hidden_ranges([False, True, True, False, True]) == ((1, 3), (4, 5))
    assert hidden_ranges([]) == ()
