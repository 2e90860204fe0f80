"""Forwards waiting for KV pages: the scheduler's second queue, beside the one for steps.

A forward whose pages the pool cannot give now waits here instead of failing (unless no
other program holds pages it could free). `PageWaiting`, the part of `BatchScheduler` that
runs this queue, retries the waiters on its engine thread whenever pages come free, in
`by_rank` order: higher priority first, then first come first served. The first that still
does not fit keeps everyone after it waiting, so a stream of small forwards cannot starve a big
one; if it outranks some holders, their idle contexts are swapped out first (preemption.py).
A waiter past its deadline fails with the pool's error.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pie.control.batching import PendingForward, resolve
from pie.control.context import ContextManager, KvContext
from pie.control.errors import (
    ControlError,
    ForwardCancelledError,
    PoolExhaustedError,
    SchedulerStoppedError,
)
from pie.control.forward import ForwardRequest
from pie.control.preemption import make_room
from pie.engine.errors import EngineError
from pie.engine.request import SampleResult


@dataclass(slots=True, eq=False)  # eq=False: identity hashing, for sets of waiters
class PageWait:
    """A forward waiting for KV pages: admitted when the pool has room, failed at `deadline`."""

    request: ForwardRequest
    future: Future[list[SampleResult]]
    priority: int
    order: int  # arrival, for first come first served within a priority
    deadline: float

    @property
    def context(self) -> KvContext:
        return self.request.context


class PageWaitQueue:
    """Not thread-safe: the scheduler holds its lock around every call."""

    def __init__(self) -> None:
        self._waits: list[PageWait] = []
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._waits)

    def add(
        self,
        request: ForwardRequest,
        future: Future[list[SampleResult]],
        priority: int,
        wait_s: float,
    ) -> PageWait:
        wait = PageWait(request, future, priority, next(self._arrivals), time.monotonic() + wait_s)
        self._waits.append(wait)
        return wait

    def holds(self, ctx: KvContext) -> bool:
        """Whether a forward of `ctx` waits (its later forwards must queue behind it)."""
        return any(w.context is ctx for w in self._waits)

    def due(self, now: float) -> bool:
        """Whether a waiter is past its deadline or was cancelled by its caller."""
        return any(w.deadline <= now or w.future.cancelled() for w in self._waits)

    def by_rank(self) -> list[PageWait]:
        return sorted(self._waits, key=lambda w: (-w.priority, w.order))

    def remove(self, settled: set[PageWait]) -> set[PageWait]:
        """Removes `settled`; returns those that were still here."""
        present = {w for w in self._waits if w in settled}
        if present:
            self._waits = [w for w in self._waits if w not in present]
        return present

    def take(self, owner: int | None) -> list[PageWait]:
        """Removes and returns `owner`'s waiters (None: everyone's)."""
        gone = [w for w in self._waits if owner is None or w.context.owner == owner]
        if gone:
            self.remove(set(gone))
        return gone

    def next_deadline(self) -> float | None:
        """Seconds until the first deadline; None if nobody waits."""
        if not self._waits:
            return None
        return max(0.0, min(w.deadline for w in self._waits) - time.monotonic())


def waited_too_long(seconds: float, error: PoolExhaustedError | None = None) -> PoolExhaustedError:
    now = f" (now: {error})" if error is not None else ""
    return PoolExhaustedError(
        f"KV pool exhausted: waited {seconds:g} s for free pages; free pages (close or truncate "
        f"contexts), claim a budget at launch, or raise --kv-pages{now}"
    )


class PageWaiting:
    """The scheduler's side of the wait for pages (`BatchScheduler` inherits it): queueing a
    forward the pool cannot take now, retrying the waiters when pages come free, preemption.
    Runs under the scheduler's lock where marked; `_admit` and `_enqueue` are its own."""

    engine: Any
    page_wait_s: float
    max_swapped_pages: int
    preempted_pages: int
    _cond: threading.Condition
    _contexts: ContextManager | None
    _page_waits: PageWaitQueue
    _retry_pages: bool
    _priority: dict[int, int]
    _unsettled: dict[KvContext, int]
    _stopping: bool

    # Declared here for the type checker; `BatchScheduler` defines them.
    def _admit(self, request: ForwardRequest, future: Future[list[SampleResult]]) -> PendingForward:
        raise NotImplementedError("BatchScheduler._admit")

    def _enqueue(self, admitted: list[PendingForward], counted: bool = False) -> None:
        raise NotImplementedError("BatchScheduler._enqueue")

    def _behind_page_waiters(self, request: ForwardRequest) -> bool:
        """Whether `request` must queue behind forwards waiting for pages: its context has one
        waiting (forwards of a context run in order), or it needs pages and others wait."""
        if not self._page_waits:  # the usual case, read without the lock: no waiter to respect
            return False
        with self._cond:
            if not self._page_waits:
                return False
            if self._page_waits.holds(request.context):
                return True
        contexts = self._contexts
        return (
            contexts is not None and contexts.pages_needed(request.context, len(request.tokens)) > 0
        )

    def _others_could_free(self, request: ForwardRequest) -> bool:
        """Whether waiting can help: pages free or held by other owners (exports included)
        cover what `request` needs. A program that itself holds what it lacks fails at once
        instead of waiting for itself."""
        contexts = self._contexts
        if contexts is None:
            return False
        pool, owner = contexts.pool, request.context.owner
        others = pool.used_count - len(pool.owned(owner))
        need = contexts.pages_needed(request.context, len(request.tokens))
        return others + pool.available(owner) >= need

    def _wait_for_pages(self, request: ForwardRequest, future: Future[list[SampleResult]]) -> None:
        ctx = request.context
        with self._cond:
            if self._stopping:
                future.set_exception(SchedulerStoppedError("the scheduler stopped"))
                return
            priority = self._priority.get(ctx.owner, 0)
            self._page_waits.add(request, future, priority, self.page_wait_s)
            self._unsettled[ctx] = self._unsettled.get(ctx, 0) + 1  # wait_idle waits for it
            self._retry_pages = True  # the engine thread times the deadline
            self._cond.notify_all()

    def _on_pages_freed(self) -> None:
        with self._cond:
            if self._page_waits:
                self._retry_pages = True
                self._cond.notify_all()

    def _retry_page_waits(self) -> None:
        """(Engine thread.) Admits waiting forwards in priority order while pages last; fails
        those past their deadline. The first that still does not fit keeps the rest waiting."""
        now = time.monotonic()
        with self._cond:
            freed, self._retry_pages = self._retry_pages, False
            if not self._page_waits or not (freed or self._page_waits.due(now)):
                return
            order = self._page_waits.by_rank()
        admitted: dict[PageWait, PendingForward] = {}
        failed: dict[PageWait, BaseException] = {}
        blocked = False
        for wait in order:
            if wait.future.cancelled():
                failed[wait] = ForwardCancelledError("the caller cancelled the forward")
            elif blocked:
                if wait.deadline <= now:
                    failed[wait] = waited_too_long(self.page_wait_s)
            else:
                try:
                    admitted[wait] = self._admit_or_preempt(wait)
                except PoolExhaustedError as exc:
                    blocked = True
                    if wait.deadline <= now:
                        failed[wait] = waited_too_long(self.page_wait_s, exc)
                except (ControlError, EngineError) as exc:
                    failed[wait] = exc
        with self._cond:
            # A waiter its owner's cancel took meanwhile is that cancel's to fail.
            present = self._page_waits.remove({*admitted, *failed})
            for wait in present - admitted.keys():
                self._unsettle(wait.context)
        self._enqueue([f for w, f in admitted.items() if w in present], counted=True)
        for wait, error in failed.items():
            if wait in present:
                resolve(wait.future, None, error)

    def _admit_or_preempt(self, wait: PageWait) -> PendingForward:
        """Admits a page waiter; if the pool is short, first swaps out contexts of
        lower-priority owners to make room (see preemption.py), where the engine can."""
        try:
            return self._admit(wait.request, wait.future)
        except PoolExhaustedError:
            contexts, save = self._contexts, getattr(self.engine, "save_pages", None)
            if contexts is None or save is None or self.max_swapped_pages <= 0:
                raise
            owner = wait.context.owner
            short = contexts.pages_needed(wait.context, len(wait.request.tokens))
            short -= contexts.pool.available(owner)
            with self._cond:
                priorities = dict(self._priority)
            freed = make_room(
                contexts,
                lambda o: priorities.get(o, 0),
                for_owner=owner,
                priority=wait.priority,
                pages=short,
                save=save,
                max_pages=self.max_swapped_pages,
            )
            if not freed:
                raise
            self.preempted_pages += freed
            return self._admit(wait.request, wait.future)

    def _unsettle(self, ctx: KvContext) -> None:
        """One forward of `ctx` will not run after all (lock held)."""
        left = self._unsettled.pop(ctx, 0) - 1
        if left > 0:
            self._unsettled[ctx] = left
        self._cond.notify_all()

    def _drop_page_waits(self, owner: int | None) -> list[PageWait]:
        """Takes `owner`'s page waiters (None: all) out of the queue (lock held)."""
        gone = self._page_waits.take(owner)
        for wait in gone:
            self._unsettle(wait.context)
        return gone
