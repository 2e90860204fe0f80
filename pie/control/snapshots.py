"""Named KV snapshots: a context's pages kept under a user's name, past the instance that saved it.

Exports (exports.py) are server-wide names that live until withdrawn. A snapshot instead belongs
to a user (the identity of the launching client, `InstanceLimits.user`): only that user's
instances list, open or delete it. It expires `ttl_s` after its save and counts against the
user's page quota. The store holds one reference on each page (as the pool owner
SNAPSHOT_OWNER), shared copy-on-write with the saving context like a fork, so a save copies
nothing; `open` gives the opener its own references on the same pages.

With a `SnapshotDisk` (`--snapshot-dir`) each save is also written to disk, and a restarted
process lists the files and loads a snapshot's pages back into the pool on its first open.

    saved:   ctx.pages [ p0 | p1 | p2 (partial) ]  ──retain──▶  SNAPSHOT_OWNER holds p0 p1 p2
    opened:  new ctx   [ p0 | p1 | p2 ]  (the first append copies p2, as after a fork)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pie.control.errors import ControlError, InvalidRequestError
from pie.control.page_pool import OwnerId, PagePool

if TYPE_CHECKING:
    from pie.control.snapshot_disk import SnapshotDisk

SNAPSHOT_OWNER: OwnerId = -3  # the pool owner under which the store holds snapshot pages
LOCAL_USER = "local"  # the one user of `pie run` (and of a server's loopback clients)
MAX_NAME = 256


class SnapshotError(ControlError):
    """A snapshot cannot be saved, opened or deleted; the message says why and what to do."""


class SnapshotNotFoundError(SnapshotError):
    """The user has no (unexpired) snapshot of that name."""


class SnapshotQuotaError(SnapshotError):
    """A save would pass the user's snapshot page quota; nothing was saved."""


@dataclass(frozen=True, slots=True)
class SnapshotSettings:
    """How long snapshots live, how many pages a user may keep, and where they persist."""

    ttl_s: float = 3600.0  # a save that names no TTL
    max_ttl_s: float = 7 * 86400.0  # the longest TTL a save may ask for
    quota_pages: int | None = None  # pages per user; None: a quarter of the pool
    directory: str | None = None  # `--snapshot-dir`: persist to (and restore from) here


@dataclass(frozen=True, slots=True)
class SnapshotContent:
    """What a context is, apart from its pages: its length, the host's record of its tokens
    (None when it was not filled by plain appends: the prefix cache must not key it), and its
    hidden (masked) slot ranges [start, end)."""

    length: int
    tokens: tuple[int, ...] | None
    hidden: tuple[tuple[int, int], ...] = ()


@dataclass(slots=True)
class Snapshot:
    """One stored snapshot. `pages` is None while it is only on disk (not yet opened)."""

    user: str
    name: str
    content: SnapshotContent
    page_count: int
    expires_at: float  # on the store's clock (wall time: it outlives the process)
    pages: list[int] | None = None
    refusal: str | None = None  # why this process cannot open it (saved for another model)
    key: str = ""  # its file stem on disk


@dataclass(frozen=True, slots=True)
class Opened:
    """An opened snapshot: `pages` are held for the opener already; `restore` is the KV to
    write into them first (a snapshot loaded from disk), else None."""

    pages: list[int]
    content: SnapshotContent
    restore: Any = None


class SnapshotStore:
    """(user, name) -> Snapshot, with TTL expiry, a per-user page quota and optional disk
    persistence. Thread-safe; `clock` is injectable (tests expire snapshots without sleeping)."""

    def __init__(
        self,
        pool: PagePool,
        settings: SnapshotSettings | None = None,
        *,
        disk: SnapshotDisk | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self.settings = settings or SnapshotSettings()
        self.quota_pages = self.settings.quota_pages or max(1, pool.num_pages // 4)
        self.disk = disk
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshots: dict[tuple[str, str], Snapshot] = {}
        if disk is not None:
            for found in disk.scan(clock()):
                self._snapshots[(found.user, found.name)] = found

    # ---- the owner's operations -----------------------------------------------------------------
    def save(
        self,
        user: str,
        name: str,
        pages: list[int],
        content: SnapshotContent,
        ttl_s: float | None = None,
        read_pages: Callable[[list[int]], Any] | None = None,
    ) -> Snapshot:
        """Keeps `pages` (the saver holds them) under (`user`, `name`), replacing the user's
        snapshot of that name. With a disk, `read_pages(pages)` gives their KV to write."""
        _check_name(name)
        ttl = self._ttl(ttl_s)
        with self._lock:
            self._expire()
            old = self._snapshots.get((user, name))
            kept = self._user_pages(user) - (old.page_count if old is not None else 0)
            if kept + len(pages) > self.quota_pages:
                raise SnapshotQuotaError(
                    f"snapshot {name!r} needs {len(pages)} pages; user {user!r} keeps {kept} "
                    f"in snapshots and the snapshot quota is {self.quota_pages} pages: delete "
                    "some snapshots (or raise snapshot_quota_pages)"
                )
            self._pool.retain(SNAPSHOT_OWNER, pages)
            snap = Snapshot(user, name, content, len(pages), self._clock() + ttl, list(pages))
            try:
                if self.disk is not None:
                    if read_pages is None:
                        raise InvalidRequestError("a snapshot directory needs the pages' KV")
                    snap.key = self.disk.write(snap, read_pages(list(pages)))
            except BaseException:
                self._pool.release(SNAPSHOT_OWNER, pages)
                raise
            if old is not None:
                self._drop(old, keep_file=old.key == snap.key)
            self._snapshots[(user, name)] = snap
            return snap

    def open(
        self,
        user: str,
        name: str,
        owner: OwnerId,
        load: Callable[[list[int], Any], None] | None = None,
    ) -> Opened:
        """`owner` takes a reference on each page of the user's snapshot `name`. A snapshot
        only on disk is read first into new pages, its KV handed to `load(pages, data)` (the
        scheduler's restore, run before the next batch); the store keeps those pages too."""
        with self._lock:
            self._expire()
            snap = self._get(user, name)
            if snap.refusal is not None:
                raise SnapshotError(snap.refusal)
            restore = None
            if snap.pages is None:
                assert self.disk is not None, "a snapshot without pages comes from a disk"
                data = self.disk.read(snap)
                fresh = self._pool.allocate(owner, snap.page_count)
                self._pool.retain(SNAPSHOT_OWNER, fresh)
                snap.pages, restore = fresh, data
                if load is not None:
                    load(fresh, data)
                    restore = None
            else:
                self._pool.retain(owner, snap.pages)
            return Opened(list(snap.pages), snap.content, restore)

    def delete(self, user: str, name: str) -> None:
        with self._lock:
            self._expire()
            self._drop(self._get(user, name))

    def names(self, user: str) -> list[str]:
        """The user's unexpired snapshot names, sorted (no one else's)."""
        with self._lock:
            self._expire()
            return sorted(n for u, n in self._snapshots if u == user)

    def get(self, user: str, name: str) -> Snapshot:
        with self._lock:
            self._expire()
            return replace(self._get(user, name))

    def expire(self) -> int:
        """Drops every expired snapshot now (pages and files); returns how many."""
        with self._lock:
            return self._expire()

    def clear(self) -> None:
        """Gives back every page the store holds (at shutdown); files on disk stay."""
        with self._lock:
            for snap in self._snapshots.values():
                if snap.pages is not None:
                    self._pool.release(SNAPSHOT_OWNER, snap.pages)
            self._snapshots.clear()

    def pages_of(self, user: str) -> int:
        with self._lock:
            return self._user_pages(user)

    # ---- internals (lock held) ----------------------------------------------------------------------
    def _ttl(self, ttl_s: float | None) -> float:
        if ttl_s is None:
            return self.settings.ttl_s
        if not 0 < ttl_s <= self.settings.max_ttl_s:
            raise InvalidRequestError(
                f"a snapshot's TTL is 1 to {self.settings.max_ttl_s:.0f} seconds, got {ttl_s}"
            )
        return float(ttl_s)

    def _get(self, user: str, name: str) -> Snapshot:
        snap = self._snapshots.get((user, name))
        if snap is None:  # another user's snapshot of that name is not even acknowledged
            raise SnapshotNotFoundError(
                f"no snapshot named {name!r} (it expired, was deleted, or was never saved by "
                "this user); list the snapshots to see the names"
            )
        return snap

    def _user_pages(self, user: str) -> int:
        return sum(s.page_count for s in self._snapshots.values() if s.user == user)

    def _expire(self) -> int:
        now = self._clock()
        gone = [s for s in self._snapshots.values() if s.expires_at <= now]
        for snap in gone:
            self._drop(snap)
        return len(gone)

    def _drop(self, snap: Snapshot, keep_file: bool = False) -> None:
        self._snapshots.pop((snap.user, snap.name), None)
        if snap.pages is not None:
            self._pool.release(SNAPSHOT_OWNER, snap.pages)
        if self.disk is not None and snap.key and not keep_file:
            self.disk.remove(snap.key)


def _check_name(name: str) -> None:
    if not name or len(name) > MAX_NAME:
        raise InvalidRequestError(f"snapshot names are 1 to {MAX_NAME} characters, got {len(name)}")


def hidden_ranges(hidden: Any) -> tuple[tuple[int, int], ...]:
    """The [start, end) runs of True in a bool sequence (a context's hidden bitmap)."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, bit in enumerate([*list(hidden), False]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return tuple(runs)
