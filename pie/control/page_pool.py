"""The KV page pool: which pages are free, who holds references on the others, and how many.

Pure mechanism. Quota values and set-asides are set by the caller; who may take pages when is
decided above (contexts, scheduler). A page is free exactly when no owner holds a reference on
it; fork and import add references, so a shared page is freed by its last holder.

A set-aside (`set_aside`, a launch's claimed budget) keeps free pages for one owner: the others
may take only the free pages beyond what every other owner's set-aside still lacks.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable

from pie.control.errors import (
    IntegrityError,
    InvalidRequestError,
    NotOwnerError,
    PoolExhaustedError,
    QuotaExceededError,
    UnknownPageError,
)

OwnerId = int  # an inferlet instance id (the export registry holds pages as an owner too)


class PagePool:
    """Fixed pool of `num_pages` KV pages with per-owner reference counts. Thread-safe.

    Free pages are handed out first-freed-last (a FIFO queue): allocation takes from the front,
    freed pages join the back, so ids are predictable and a just-freed page is reused last.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise InvalidRequestError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._lock = threading.Lock()
        self._free: deque[int] = deque(range(num_pages))
        self._refs: list[int] = [0] * num_pages  # total references per page, all owners
        self._held: dict[OwnerId, dict[int, int]] = {}  # owner -> page -> references it holds
        self._quota: dict[OwnerId, int] = {}
        self._aside: dict[OwnerId, int] = {}  # pages set aside per owner (its claimed budget)
        self._free_listeners: list[Callable[[], None]] = []
        # Asked for the pages an allocation or a set-aside lacks before it fails (the prefix
        # cache gives back pages only it holds); returns how many it freed. Called without the
        # pool's lock: it frees through `release`.
        self.reclaim: Callable[[int], int] | None = None

    # ---- queries ------------------------------------------------------------------------------
    @property
    def free_count(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def used_count(self) -> int:
        with self._lock:
            return self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        with self._lock:
            self._check_range(page)
            return self._refs[page]

    def owned(self, owner: OwnerId) -> dict[int, int]:
        """Pages `owner` holds references on, and how many references on each."""
        with self._lock:
            return dict(self._held.get(owner, {}))

    def quota(self, owner: OwnerId) -> int | None:
        with self._lock:
            return self._quota.get(owner)

    def available(self, owner: OwnerId) -> int:
        """Free pages `owner` may take now: the free ones, less what others have set aside."""
        with self._lock:
            return len(self._free) - self._owed(but=owner)

    def add_free_listener(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` (outside the pool's lock) whenever pages become free: the
        scheduler retries the forwards waiting for pages."""
        self._free_listeners.append(listener)

    # ---- changes ------------------------------------------------------------------------------
    def set_quota(self, owner: OwnerId, max_pages: int | None) -> None:
        """Cap the distinct pages `owner` may hold references on (None: no cap).

        Lowering a quota below what the owner holds takes nothing away; it only stops growth.
        """
        if max_pages is not None and max_pages < 0:
            raise InvalidRequestError(f"a page quota cannot be negative, got {max_pages}")
        with self._lock:
            if max_pages is None:
                self._quota.pop(owner, None)
            else:
                self._quota[owner] = max_pages

    def set_aside(self, owner: OwnerId, pages: int) -> None:
        """Keeps `pages` pages for `owner` from now on (0: none): pages it holds count toward
        them, and no other owner can take the rest. Raises PoolExhaustedError, with nothing
        set aside, if the free pages not set aside for others cannot cover it."""
        if pages < 0:
            raise InvalidRequestError(f"cannot set aside {pages} pages; ask for zero or more")
        try:
            self._set_aside(owner, pages)
        except PoolExhaustedError:
            if not self._reclaimed(pages - len(self.owned(owner)) - self.available(owner)):
                raise
            self._set_aside(owner, pages)

    def _set_aside(self, owner: OwnerId, pages: int) -> None:
        with self._lock:
            lacking = max(0, pages - len(self._held.get(owner, ())))
            free = len(self._free) - self._owed(but=owner)
            if lacking > free:
                raise PoolExhaustedError(
                    f"KV pool exhausted: cannot set aside {pages} pages, {free} of "
                    f"{self.num_pages} are free and not set aside for others"
                )
            if pages:
                self._aside[owner] = pages
            else:
                self._aside.pop(owner, None)

    def allocate(self, owner: OwnerId, n: int) -> list[int]:
        """Take `n` free pages for `owner` (one reference each), in free-queue order.

        Raises PoolExhaustedError or QuotaExceededError with nothing allocated.
        """
        if n < 0:
            raise InvalidRequestError(f"cannot allocate {n} pages; ask for zero or more")
        try:
            return self._allocate(owner, n)
        except PoolExhaustedError:
            if not self._reclaimed(n - self.available(owner)):
                raise
            return self._allocate(owner, n)

    def _reclaimed(self, lacking: int) -> bool:
        """Whether `reclaim` freed the `lacking` pages."""
        return self.reclaim is not None and lacking > 0 and self.reclaim(lacking) >= lacking

    def _allocate(self, owner: OwnerId, n: int) -> list[int]:
        with self._lock:
            self._check_quota(owner, n)
            free = len(self._free) - self._owed(but=owner)
            if n > free:
                aside = (
                    f" ({len(self._free) - free} set aside for others)"
                    if free < len(self._free)
                    else ""
                )
                raise PoolExhaustedError(
                    f"KV pool exhausted: {free} of {self.num_pages} pages free{aside}, {n} "
                    "requested; free pages (close or truncate contexts) or raise --kv-pages"
                )
            pages = [self._free.popleft() for _ in range(n)]
            held = self._held.setdefault(owner, {})
            for page in pages:
                self._refs[page] = 1
                held[page] = 1
            return pages

    def retain(self, owner: OwnerId, pages: Iterable[int]) -> None:
        """`owner` takes one more reference on each of `pages` (live pages only; fork, import).

        Raises UnknownPageError for a free or out-of-range page and QuotaExceededError when the
        pages new to `owner` would pass its quota; in both cases nothing changes.
        """
        pages = list(pages)
        with self._lock:
            for page in pages:
                self._check_live(page)
            held = self._held.get(owner, {})
            self._check_quota(owner, len({p for p in pages if p not in held}))
            held = self._held.setdefault(owner, {})
            for page in pages:
                self._refs[page] += 1
                held[page] = held.get(page, 0) + 1

    def release(self, owner: OwnerId, pages: Iterable[int]) -> list[int]:
        """Drop one of `owner`'s references per listed page; returns the pages this freed.

        Raises UnknownPageError (free or out-of-range page) or NotOwnerError (a page `owner`
        holds fewer references on than listed) before changing anything.
        """
        wanted = Counter(pages)
        with self._lock:
            held = self._held.get(owner, {})
            for page, count in wanted.items():
                self._check_live(page)
                if held.get(page, 0) < count:
                    raise NotOwnerError(
                        f"owner {owner} releases page {page} {count} time(s) but holds "
                        f"{held.get(page, 0)} reference(s); release only pages it holds"
                    )
            freed = [p for p, count in wanted.items() if self._drop(owner, p, count)]
        if freed:
            self._tell_freed()
        return freed

    def release_owner(self, owner: OwnerId) -> int:
        """Drop every reference `owner` holds (its instance ended) and its set-aside; returns
        pages freed."""
        with self._lock:
            held = dict(self._held.get(owner, {}))
            freed = sum(self._drop(owner, page, count) for page, count in held.items())
            self._held.pop(owner, None)
            aside = self._aside.pop(owner, 0)
        if freed or aside:
            self._tell_freed()
        return freed

    def _tell_freed(self) -> None:
        for listener in self._free_listeners:
            listener()

    def check_integrity(self) -> None:
        """Raise IntegrityError unless free + referenced == total and refcounts match holders."""
        with self._lock:
            free = set(self._free)
            if len(free) != len(self._free):
                raise IntegrityError("a page appears twice in the free queue")
            totals = [0] * self.num_pages
            for owner, held in self._held.items():
                for page, count in held.items():
                    if count <= 0:
                        raise IntegrityError(f"owner {owner} holds {count} references on {page}")
                    totals[page] += count
            for page in range(self.num_pages):
                if totals[page] != self._refs[page]:
                    raise IntegrityError(
                        f"page {page}: refcount {self._refs[page]}, holders sum {totals[page]}"
                    )
                if (self._refs[page] == 0) != (page in free):
                    raise IntegrityError(
                        f"page {page}: refcount {self._refs[page]} but "
                        f"{'in' if page in free else 'not in'} the free queue"
                    )

    # ---- internals (lock held) ----------------------------------------------------------------
    def _owed(self, but: OwnerId) -> int:
        """Free pages kept for owners other than `but`: what their set-asides still lack."""
        return sum(
            max(0, pages - len(self._held.get(owner, ())))
            for owner, pages in self._aside.items()
            if owner != but
        )

    def _drop(self, owner: OwnerId, page: int, count: int) -> bool:
        """Remove `count` of `owner`'s references on `page`; True if the page became free."""
        held = self._held[owner]
        held[page] -= count
        if held[page] == 0:
            del held[page]
        self._refs[page] -= count
        if self._refs[page] == 0:
            self._free.append(page)
            return True
        return False

    def _check_quota(self, owner: OwnerId, new_pages: int) -> None:
        limit = self._quota.get(owner)
        if limit is None:
            return
        holds = len(self._held.get(owner, ()))
        if holds + new_pages > limit:
            raise QuotaExceededError(
                f"owner {owner} holds {holds} pages of its quota of {limit}, {new_pages} more "
                "requested; close or truncate contexts, or raise the instance's page limit"
            )

    def _check_range(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise UnknownPageError(f"page {page} is outside the pool [0, {self.num_pages})")

    def _check_live(self, page: int) -> None:
        self._check_range(page)
        if self._refs[page] == 0:
            raise UnknownPageError(f"page {page} is free (never allocated or already freed)")
