"""KV contexts: the host-side record of one KV sequence, and the operations on it.

A context owns references on pool pages; fork and import share them, and the first append into a
shared partial page copies it (copy-on-write). The copies are queued to the scheduler, which runs
them before the next batch; operations that change shared pages wait until the context is idle.

A context with no forward in flight can be swapped out (`swap_out`, the scheduler's preemption
for a higher-priority program): the pages only it holds go to host memory and back to the pool.
Its next use brings them back first (new pages, restored before the next batch), so the owner
sees nothing but the wait for those pages.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pie.control.errors import ContextClosedError, InvalidRequestError
from pie.control.exports import ExportRegistry
from pie.control.page_pool import OwnerId, PagePool


def _no_hidden() -> np.ndarray:
    return np.zeros(0, dtype=np.bool_)


SWAPPED = -1  # a page id standing for a page now in host memory


@dataclass(slots=True)
class SwappedPages:
    """Pages of a context in host memory: where they sat in `pages`, and their saved KV."""

    indexes: list[int]
    data: Any  # the engine's copy, in the order of `indexes`


@dataclass(slots=True, eq=False)  # eq=False: contexts hash by identity (scheduler dict keys)
class KvContext:
    """Slot s lives in page `pages[s // page_size]` at offset `s % page_size`.

        pages:  [ p0 (shared) | p1 (shared) | p2 (shared, partial) | p3 (own, reserved) ]
        slots:    0 .. ps-1     ps .. 2ps-1   2ps .. length-1        ...
                  fork/export share pages[:ceil(length / ps)]; pages past that are never shared

    `length` counts slots reserved by submitted forwards (written or in flight). `hidden` is a
    bitmap over slots 0 .. len(hidden)-1 (masked: kept but not attended); later slots are visible.
    """

    id: int
    owner: OwnerId
    pages: list[int] = field(default_factory=list)
    length: int = 0
    hidden: np.ndarray = field(default_factory=_no_hidden)
    closed: bool = False
    swapped: SwappedPages | None = None  # pages in host memory (their ids here are SWAPPED)
    in_flight: int = 0  # forwards reserved and not yet settled (swap only at 0)
    # The token in each slot, while every forward went in with default positions and no mask
    # (None after any other): what the prefix cache may key its pages by.
    tokens: list[int] | None = field(default_factory=list)
    cache_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its first pages


class CopySink(Protocol):
    """Where contexts send page copies and wait for in-flight forwards: the batch scheduler."""

    page_size: int

    def queue_copies(self, pairs: list[tuple[int, int, int]]) -> None:
        """Run engine.copy_pages(pairs) before the next batch."""
        ...

    def wait_idle(self, ctx: KvContext) -> None:
        """Return once no forward of `ctx` is queued or running."""
        ...

    def bind_contexts(self, contexts: ContextManager) -> None:
        """Learn the manager that reserves slots for submitted forwards."""
        ...

    def queue_restore(self, pages: list[int], data: Any) -> None:
        """Write swapped-out KV `data` into `pages` before the next batch."""
        ...

    def copies_pending(self) -> bool:
        """Whether page copies or restores are queued and not yet run."""
        ...


class ContextManager:
    """Makes and operates KvContexts over one page pool. Thread-safe.

    A context's operations are expected from its owner's thread; fork, truncate, export and
    close first wait until the context's submitted forwards have run.
    """

    def __init__(self, pool: PagePool, exports: ExportRegistry, sink: CopySink) -> None:
        self._pool = pool
        self._exports = exports
        self._sink = sink
        self.page_size = sink.page_size
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._open: dict[OwnerId, dict[int, KvContext]] = {}
        # Guards KvContext.in_flight alone, and takes no other lock: the scheduler settles
        # forwards under its own lock, which may not wait for this manager's.
        self._flight = threading.Lock()
        self.swapped_pages = 0  # pages of all contexts now in host memory
        sink.bind_contexts(self)

    # ---- lifecycle ----------------------------------------------------------------------------
    def create(self, owner: OwnerId) -> KvContext:
        with self._lock:
            return self._new(owner, [], 0, _no_hidden())

    def fork(self, ctx: KvContext) -> KvContext:
        """A new context of the same owner sharing all of `ctx`'s filled pages copy-on-write."""
        self._idle(ctx)
        with self._lock:
            self._check_open(ctx)
            self._resident(ctx)
            shared = ctx.pages[: self._pages_for(ctx.length)]
            self._pool.retain(ctx.owner, shared)
            child = self._new(ctx.owner, list(shared), ctx.length, ctx.hidden.copy())
            child.tokens = None if ctx.tokens is None else ctx.tokens[: ctx.length]
            child.cache_keys = ctx.cache_keys[: ctx.length // self.page_size]
            return child

    def import_(self, owner: OwnerId, name: str) -> KvContext:
        """A new context on the pages exported as `name` (shared; appends copy the last page)."""
        pages, length = self._exports.import_(owner, name)
        with self._lock:
            ctx = self._new(owner, pages, length, _no_hidden())
            ctx.tokens = None  # the exporter's record does not travel with its pages
            return ctx

    def adopt(self, ctx: KvContext, pages: list[int], tokens: list[int], keys: list[bytes]) -> None:
        """An empty context takes `pages` (references already held for its owner: the prefix
        cache's, keyed `keys`) as its first slots, filled with `tokens`."""
        with self._lock:
            self._check_open(ctx)
            if ctx.length or ctx.pages:
                raise InvalidRequestError("only an empty context adopts cached pages")
            ctx.pages = list(pages)
            ctx.length = len(tokens)
            ctx.tokens = list(tokens)
            ctx.cache_keys = list(keys)

    def unadopt(self, ctx: KvContext) -> None:
        """Undoes `adopt` (the forward that adopted the pages could not be admitted)."""
        with self._lock:
            if not ctx.closed and not ctx.in_flight:
                self._pool.release(ctx.owner, ctx.pages)
                ctx.pages, ctx.length, ctx.tokens, ctx.cache_keys = [], 0, [], []

    def export(self, ctx: KvContext, name: str) -> None:
        """Publish `ctx`'s filled pages and length under `name`."""
        self._idle(ctx)
        with self._lock:
            self._check_open(ctx)
            self._resident(ctx)
            shared = ctx.pages[: self._pages_for(ctx.length)]
            self._exports.export(ctx.owner, name, shared, ctx.length)

    def snapshot_of(self, ctx: KvContext) -> tuple[list[int], int, list[int] | None, np.ndarray]:
        """What a snapshot of `ctx` keeps (queued tokens run first, pages resident): its filled
        pages (shared, as a fork's), length, recorded tokens and hidden bitmap."""
        self._idle(ctx)
        with self._lock:
            self._check_open(ctx)
            self._resident(ctx)
            tokens = None if ctx.tokens is None else ctx.tokens[: ctx.length]
            pages = ctx.pages[: self._pages_for(ctx.length)]
            return list(pages), ctx.length, tokens, ctx.hidden[: ctx.length].copy()

    def open_pages(
        self, owner: OwnerId, pages: list[int], length: int, tokens: list[int] | None,
        hidden: np.ndarray,
    ) -> KvContext:  # fmt: skip
        """A new context on `pages` (references already held for `owner`: an opened snapshot's)."""
        with self._lock:
            ctx = self._new(owner, list(pages), length, hidden)
            ctx.tokens = None if tokens is None else list(tokens)
            return ctx

    def close(self, ctx: KvContext) -> None:
        """Release every page reference of `ctx`; the context can no longer be used."""
        self._idle(ctx)
        with self._lock:
            self._check_open(ctx)
            self._drop_swapped(ctx)
            self._pool.release(ctx.owner, ctx.pages)
            ctx.pages = []
            ctx.closed = True
            self._open[ctx.owner].pop(ctx.id)

    def close_owner(self, owner: OwnerId) -> int:
        """Close every context of `owner` and drop all its page references; returns pages freed.

        Call scheduler.cancel_owner(owner) first, so none of its forwards is still running.
        """
        with self._lock:
            for ctx in self._open.pop(owner, {}).values():
                self._drop_swapped(ctx)
                ctx.pages = []
                ctx.closed = True
            return self._pool.release_owner(owner)

    def all_contexts(self) -> list[KvContext]:
        with self._lock:
            return [ctx for contexts in self._open.values() for ctx in contexts.values()]

    def contexts_of(self, owner: OwnerId) -> list[KvContext]:
        with self._lock:
            return list(self._open.get(owner, {}).values())

    # ---- shape of the sequence ----------------------------------------------------------------
    def truncate(self, ctx: KvContext, length: int) -> None:
        """Keep the first `length` slots; pages past them are released (a rollback)."""
        self._idle(ctx)
        with self._lock:
            self._check_open(ctx)
            if not 0 <= length <= ctx.length:
                raise InvalidRequestError(
                    f"cannot truncate a context of {ctx.length} slots to {length}; "
                    f"pick a length in [0, {ctx.length}]"
                )
            self._resident(ctx)
            keep = self._pages_for(length)
            self._pool.release(ctx.owner, ctx.pages[keep:])
            del ctx.pages[keep:]
            ctx.length = length
            if ctx.tokens is not None:
                del ctx.tokens[length:]
            del ctx.cache_keys[length // self.page_size :]
            ctx.hidden = ctx.hidden[:length].copy()

    def mask(self, ctx: KvContext, start: int, end: int, hidden: bool) -> None:
        """Hide (or show again) slots [start, end) from the attention of later forwards."""
        with self._lock:
            self._check_open(ctx)
            if not 0 <= start <= end <= ctx.length:
                raise InvalidRequestError(
                    f"mask range [{start}, {end}) is not inside the context's {ctx.length} slots"
                )
            if end > len(ctx.hidden):
                grown = np.zeros(end, dtype=np.bool_)
                grown[: len(ctx.hidden)] = ctx.hidden
                ctx.hidden = grown
            ctx.hidden[start:end] = hidden
            ctx.tokens = None  # later slots are computed under the mask: not a plain prefix

    def hidden_before(self, ctx: KvContext, end: int) -> np.ndarray | None:
        """Bool [end]: which of slots 0 .. end-1 are hidden; None when none is."""
        with self._lock:
            if not len(ctx.hidden):  # the common case: nothing was ever masked (no numpy call)
                return None
            part = ctx.hidden[:end]
            if not part.any():
                return None
            out = np.zeros(end, dtype=np.bool_)
            out[: len(part)] = part
            return out

    # ---- growth -------------------------------------------------------------------------------
    def reserve(
        self, ctx: KvContext, n: int, tokens: list[int] | None = None
    ) -> tuple[int, list[int]]:
        """Reserve slots [length, length + n) for a forward; returns (start slot, page ids).

        Allocates the pages they need, copying a shared partial last page first. On
        PoolExhaustedError or QuotaExceededError nothing changes.
        """
        if n < 0:
            raise InvalidRequestError(f"cannot reserve {n} slots; ask for zero or more")
        with self._lock:
            self._check_open(ctx)
            self._resident(ctx)
            start = ctx.length
            self._grow(ctx, start + n)
            ctx.length = start + n
            if ctx.tokens is not None:  # `tokens`: the slots' tokens, when plainly appended
                if tokens is not None and len(ctx.tokens) == start:
                    ctx.tokens.extend(tokens)
                else:
                    ctx.tokens = None
            with self._flight:
                ctx.in_flight += 1
            return start, list(ctx.pages)

    def settled(self, ctx: KvContext) -> None:
        """A forward `reserve` was called for has run, failed or been dropped."""
        with self._flight:
            ctx.in_flight = max(0, ctx.in_flight - 1)

    def unreserve(self, ctx: KvContext, start: int, end: int) -> None:
        """Undo reserve(ctx, end - start) of a forward that will not run.

        Only if nothing was reserved after it; its pages stay with the context as capacity.
        """
        with self._lock:
            if not ctx.closed and ctx.length == end:
                ctx.length = start
        self.settled(ctx)

    def preallocate(self, ctx: KvContext, slots: int) -> None:
        """Allocate pages for `slots` more slots now (and do any copy-on-write), so later
        forwards of up to that many tokens cannot run out. The length does not change."""
        if slots < 0:
            raise InvalidRequestError(f"cannot preallocate {slots} slots; ask for zero or more")
        with self._lock:
            self._check_open(ctx)
            self._resident(ctx)
            self._grow(ctx, ctx.length + slots)

    def pages_needed(self, ctx: KvContext, n: int) -> int:
        """Pages `reserve(ctx, n)` would allocate now (new ones, plus a copy-on-write)."""
        with self._lock:
            self._check_open(ctx)
            return self._pages_missing(ctx, ctx.length + n)

    @property
    def pool(self) -> PagePool:
        return self._pool

    # ---- swapping (the scheduler's preemption) ----------------------------------------------
    def swap_out(self, ctx: KvContext, save: Callable[[list[int]], Any]) -> int:
        """Moves the pages only `ctx` holds to host memory (`save(pages)` copies them there;
        on the engine thread, between steps); returns how many pages that freed. Does nothing
        to a context with a forward in flight, or while page copies wait to run."""
        with self._lock:
            if ctx.closed or ctx.swapped is not None or self._sink.copies_pending():
                return 0
            with self._flight:
                if ctx.in_flight:
                    return 0
            indexes = [i for i, page in enumerate(ctx.pages) if self._pool.refcount(page) == 1]
            if not indexes:
                return 0
            pages = [ctx.pages[i] for i in indexes]
            ctx.swapped = SwappedPages(indexes, save(pages))
            self._pool.release(ctx.owner, pages)
            for i in indexes:
                ctx.pages[i] = SWAPPED
            self.swapped_pages += len(pages)
            return len(pages)

    def _resident(self, ctx: KvContext) -> None:
        """Brings a swapped-out context back (lock held): new pages, their KV restored before
        the next batch. Raises PoolExhaustedError or QuotaExceededError with nothing changed."""
        swapped = ctx.swapped
        if swapped is None:
            return
        fresh = self._pool.allocate(ctx.owner, len(swapped.indexes))
        for i, page in zip(swapped.indexes, fresh, strict=True):
            ctx.pages[i] = page
        self._sink.queue_restore(fresh, swapped.data)
        ctx.swapped = None
        self.swapped_pages -= len(fresh)

    def _drop_swapped(self, ctx: KvContext) -> None:
        """Forgets a closing context's pages in host memory (lock held)."""
        if ctx.swapped is not None:
            self.swapped_pages -= len(ctx.swapped.indexes)
            ctx.pages = [p for p in ctx.pages if p != SWAPPED]
            ctx.swapped = None

    # ---- internals ----------------------------------------------------------------------------
    def _pages_missing(self, ctx: KvContext, end: int) -> int:
        ps = self.page_size
        partial = ctx.length // ps if ctx.length % ps else None
        cow = (
            end > ctx.length
            and partial is not None
            and ctx.pages[partial] != SWAPPED
            and self._pool.refcount(ctx.pages[partial]) > 1
        )
        swapped = len(ctx.swapped.indexes) if ctx.swapped is not None else 0
        return max(0, self._pages_for(end) - len(ctx.pages)) + int(cow) + swapped

    def _grow(self, ctx: KvContext, end: int) -> None:
        """Make ctx.pages cover slots [0, end) and own the page slot `length` is written to.

        The page holding slot `length`, if partial and shared (refcount > 1), is replaced by a
        fresh page with a copy of its filled slots; pages past ceil(length / ps) are never shared.
        """
        ps = self.page_size
        partial = ctx.length // ps if ctx.length % ps else None
        cow = (
            end > ctx.length and partial is not None and self._pool.refcount(ctx.pages[partial]) > 1
        )
        missing = max(0, self._pages_for(end) - len(ctx.pages))
        fresh = self._pool.allocate(ctx.owner, missing + int(cow))  # raises with nothing taken
        if cow and partial is not None:
            old, new = ctx.pages[partial], fresh.pop(0)
            self._sink.queue_copies([(old, new, ctx.length % ps)])
            ctx.pages[partial] = new
            self._pool.release(ctx.owner, [old])  # still held by the other sharers
        ctx.pages.extend(fresh)

    def _pages_for(self, slots: int) -> int:
        return -(-slots // self.page_size)

    def _new(self, owner: OwnerId, pages: list[int], length: int, hidden: np.ndarray) -> KvContext:
        ctx = KvContext(next(self._ids), owner, pages, length, hidden)
        self._open.setdefault(owner, {})[ctx.id] = ctx
        return ctx

    def _idle(self, ctx: KvContext) -> None:
        self._check_open(ctx)
        self._sink.wait_idle(ctx)

    @staticmethod
    def _check_open(ctx: KvContext) -> None:
        if ctx.closed:
            raise ContextClosedError(f"KV context {ctx.id} is closed; create or fork a new one")
