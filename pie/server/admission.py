"""`PageAdmission`: OpenAI requests wait in line for KV room instead of failing mid-stream.

An inferlet allocates its own pages, and an allocation the pool cannot meet fails (that is the
API's contract). For the OpenAI path the server knows up front how much a request can grow: the
prompt plus `max_tokens` for each choice. It reserves that many pages before launching, first
come first served, as vLLM's scheduler holds a request in its waiting queue until the KV cache
has room. Reservations count against the pool's size, so OpenAI requests alone never exhaust it;
a request that could outgrow the whole pool reserves all of it (it runs alone, and fails if it
really grows that far), and pages held by other programs (client-protocol inferlets) can still
run the pool out, failing the request that finds it empty.

Everything here runs on the server's event loop; `release` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass, field

# A request without `max_tokens` may generate up to the context length; reserving all of that
# would let a handful of such requests hold the whole pool. They reserve this much room for
# their output and grow past it on demand.
DEFAULT_OUTPUT_RESERVE = 1024


@dataclass
class _Waiter:
    pages: int
    future: asyncio.Future[None]


@dataclass
class PageAdmission:
    capacity: int  # pages the pool holds
    page_size: int
    reserved: int = 0
    _line: collections.deque[_Waiter] = field(default_factory=collections.deque)
    _loop: asyncio.AbstractEventLoop | None = None

    def pages_for(self, prompt_lengths: list[int], n: int, max_tokens: int | None) -> int:
        """Pages a request can grow to (each choice of each prompt, prompt plus output), at most
        the whole pool."""
        out = DEFAULT_OUTPUT_RESERVE if max_tokens is None else max_tokens
        pages = sum(n * -(-(length + out) // self.page_size) for length in prompt_lengths)
        return min(pages, self.capacity)

    @property
    def waiting(self) -> int:
        return len(self._line)

    async def acquire(self, pages: int) -> None:
        """Returns once `pages` (at most `capacity`) are reserved; in line behind every earlier
        request."""
        self._loop = asyncio.get_running_loop()
        if not self._line and self.reserved + pages <= self.capacity:
            self.reserved += pages
            return
        waiter = _Waiter(pages, self._loop.create_future())
        self._line.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:  # the client left while in line
            if waiter.future.done() and not waiter.future.cancelled():
                self.reserved -= pages  # admitted in the same tick: hand the room on
                self._admit()
            else:
                with contextlib.suppress(ValueError):
                    self._line.remove(waiter)
                self._admit()  # the line's head may fit now
            raise

    def release(self, pages: int) -> None:
        """Gives a finished request's reservation back (thread-safe)."""
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._release(pages)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing waits any more
                loop.call_soon_threadsafe(self._release, pages)

    def _release(self, pages: int) -> None:
        self.reserved -= pages
        self._admit()

    def _admit(self) -> None:
        while self._line and self.reserved + self._line[0].pages <= self.capacity:
            waiter = self._line.popleft()
            if waiter.future.done():  # cancelled; its acquire cleans up
                continue
            self.reserved += waiter.pages
            waiter.future.set_result(None)
