"""A minimal asyncio event loop whose idle wait is the host's `poll.wait-any` call.

WASI pollables cannot be made by a Python host, so instead of a selector over file descriptors
the loop keeps the host futures its tasks await and, when it has nothing ready to run, blocks in
one `wait-any` over all of them. Several forwards in flight and forks generating side by side
are then plain asyncio (`gather`, tasks).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

from pie.sdk._wit import Ok, PieError, call, forward, poll

T = TypeVar("T")


class _HostSelector:
    """Stands where a selector would: `select(timeout)` waits on host futures instead of fds."""

    def __init__(self) -> None:
        # host future id -> the asyncio future completed (with that id) once it is ready
        self.waiting: dict[int, asyncio.Future[int]] = {}
        # Forward passes started by tasks in this turn, sent together before the loop waits.
        self.outbox: list[tuple[int, Any, asyncio.Future[int]]] = []
        # Delegated generations started in this turn, likewise (their first passes share a step).
        self.generations: list[tuple[int, Any, asyncio.Future[int]]] = []

    def flush(self) -> bool:
        """Sends the queued generations and forward passes, each kind in one host call, so they
        share a batch.

        Each pass's future then waits for the pass to finish; each generation's future gives its
        handle at once. Returns whether some task can run now (a generation started, or a pass
        or a generation was refused).
        """
        woken = False
        starting, self.generations = self.generations, []
        if starting:
            started = forward.generate_many([(ctx, args) for ctx, args, _ in starting])
            for (_, _, fut), result in zip(starting, started, strict=True):
                if fut.cancelled():
                    if isinstance(result, Ok):
                        call(forward.generate_stop, result.value)
                elif isinstance(result, Ok):
                    fut.set_result(result.value)
                else:
                    fut.set_exception(PieError(str(result.value)))
            woken = True
        batch, self.outbox = self.outbox, []
        if not batch:
            return woken
        results = forward.execute_many([(ctx, args) for ctx, args, _ in batch])
        for (_, _, fut), result in zip(batch, results, strict=True):
            if fut.cancelled():
                if isinstance(result, Ok):
                    call(poll.discard, result.value)
            elif isinstance(result, Ok):
                self.waiting[result.value] = fut
            else:
                fut.set_exception(PieError(str(result.value)))
                woken = True
        return woken

    def select(self, timeout: float | None) -> list[Any]:
        # Passes are sent and then waited for in the same turn: a decode step costs one turn.
        if (self.outbox or self.generations) and self.flush():
            return []  # a refused pass wakes its task: run it before blocking
        for fid in [fid for fid, fut in self.waiting.items() if fut.cancelled()]:
            # Its task was cancelled: nobody will take the value, so free the host future.
            del self.waiting[fid]
            call(poll.discard, fid)
        ids = list(self.waiting)
        if not ids:
            if timeout is None:
                raise RuntimeError(
                    "the inferlet awaits something that can never complete (no host future and "
                    "no timer is pending)"
                )
            if timeout > 0:  # a sleep: wait-any over nothing is a host-side timed wait
                call(poll.wait_any, [], math.ceil(timeout * 1000))
            return []
        timeout_ms = None if timeout is None else math.ceil(timeout * 1000)
        for index in call(poll.wait_any, ids, timeout_ms):
            fut = self.waiting.pop(ids[index], None)
            if fut is not None and not fut.done():
                fut.set_result(ids[index])
        return []

    def close(self) -> None:
        self.waiting.clear()


class PieEventLoop(asyncio.BaseEventLoop):
    """asyncio loop for inferlets; one per `run` call."""

    def __init__(self) -> None:
        super().__init__()
        self._selector = _HostSelector()

    def _process_events(self, event_list: list[Any]) -> None:
        """Readiness was applied in `select` already."""

    def _write_to_self(self) -> None:
        """Guests are single-threaded: nothing to wake."""

    def queue_forward(self, context: int, args: Any) -> asyncio.Future[int]:
        """A forward pass sent when this turn ends; the future gives its host future id once
        the pass has finished (its outputs are ready to take)."""
        fut: asyncio.Future[int] = self.create_future()
        self._selector.outbox.append((context, args, fut))
        return fut

    def queue_generate(self, context: int, args: Any) -> asyncio.Future[int]:
        """A delegated generation started when this turn ends (with the others started in it);
        the future gives its handle."""
        fut: asyncio.Future[int] = self.create_future()
        self._selector.generations.append((context, args, fut))
        return fut

    def alone(self) -> bool:
        """Whether nothing but the running task could make progress now: no other callback is
        ready, no timer is set, no pass is queued and no host future is awaited. The task may
        then block in the host (one call per forward) without delaying anyone."""
        selector = self._selector
        busy = selector.outbox or selector.generations or selector.waiting
        return not (self._ready or self._scheduled or busy)  # type: ignore[attr-defined]

    def host_future(self, fid: int) -> asyncio.Future[int]:
        """An asyncio future that completes (with `fid`) when host future `fid` is ready."""
        fut: asyncio.Future[int] = self.create_future()
        self._selector.waiting[fid] = fut
        return fut


async def wait_host(fid: int) -> None:
    """Suspends the calling task until host future `fid` is ready."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, PieEventLoop):
        # Outside our loop (e.g. a foreign asyncio.run): block; correct, if not concurrent.
        call(poll.wait_any, [fid], None)
        return
    await loop.host_future(fid)


def block_on(fid: int) -> None:
    """Blocks until host future `fid` is ready (for synchronous callers)."""
    call(poll.wait_any, [fid], None)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs `coro` to completion on a fresh Pie event loop."""
    loop = PieEventLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
