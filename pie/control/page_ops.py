"""Page operations the engine thread runs before a step: copy-on-write copies, restores of
swapped-out KV, and reads of pages' KV to host memory (a snapshot written to disk).

They queue with the scheduler's lock in one list and run in order on the engine thread before
the next batch, so each sees every operation queued before it, and a forward queued after a
copy reads the copied page. `PageOps` is the part of `BatchScheduler` that queues and runs them.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pie.control.batching import Chunk, PendingForward
from pie.control.errors import SchedulerStoppedError

CopyOp = tuple[int, int, int]  # (src page, dst page, slots to copy)


@dataclass(frozen=True, slots=True)
class Restore:
    """Swapped-out KV written back into new pages (queued with the copies, run in order)."""

    pages: list[int]
    data: Any


@dataclass(frozen=True, slots=True)
class PageRead:
    """A copy of pages' KV to host memory (`engine.save_pages`; a snapshot written to disk),
    run in order with the copies and restores, so it sees every one queued before it."""

    pages: list[int]
    future: Future[Any]


PageOp = CopyOp | Restore | PageRead


class PageOps:
    """The scheduler's page operations (`BatchScheduler` inherits it); `_copy_pages` runs on its
    engine thread."""

    engine: Any
    _cond: threading.Condition
    _copies: list[PageOp]
    _stopping: bool
    _waiting: list[PendingForward]
    _running: list[Chunk]

    # Declared here for the type checker; `BatchScheduler` defines them.
    def _retire(self, forwards: list[PendingForward]) -> list[PendingForward]:
        raise NotImplementedError("BatchScheduler._retire")

    @staticmethod
    def _settle(forwards: list[PendingForward], error: BaseException) -> None:
        raise NotImplementedError("BatchScheduler._settle")

    def queue_restore(self, pages: list[int], data: Any) -> None:
        """Swapped-out KV back into `pages`, before the next batch (and any later copy)."""
        with self._cond:
            self._copies.append(Restore(list(pages), data))
            self._cond.notify_all()

    def read_pages(self, pages: list[int]) -> Future[Any]:
        """`engine.save_pages(pages)` on the engine thread, after the copies queued so far."""
        future: Future[Any] = Future()
        with self._cond:
            if self._stopping:
                raise SchedulerStoppedError("the scheduler is stopped; it reads no pages")
            self._copies.append(PageRead(list(pages), future))
            self._cond.notify_all()
        return future

    def copies_pending(self) -> bool:
        with self._cond:
            return bool(self._copies)

    def queue_copies(self, pairs: list[CopyOp]) -> None:
        """Copy-on-write page copies, run before the next batch (before any later forward)."""
        with self._cond:
            self._copies.extend(pairs)
            self._cond.notify_all()

    def _copy_pages(self, ops: list[PageOp], chunks: list[Chunk]) -> list[Chunk]:
        """Run the copies and restores in order; if they fail, fail the forwards reading the
        pages they write."""
        try:
            run: list[CopyOp] = []
            for op in ops:
                if isinstance(op, PageRead):
                    if run:
                        self.engine.copy_pages(run)
                        run = []
                    try:
                        op.future.set_result(self.engine.save_pages(op.pages))  # type: ignore[attr-defined]
                    except Exception as e:  # the reader's failure, not the step's
                        op.future.set_exception(e)
                elif isinstance(op, Restore):
                    if run:
                        self.engine.copy_pages(run)
                        run = []
                    self.engine.load_pages(op.pages, op.data)  # type: ignore[attr-defined]
                else:
                    run.append(op)
            if run:
                self.engine.copy_pages(run)
            return chunks
        except Exception as exc:
            broken = {
                p
                for op in ops
                if not isinstance(op, PageRead)
                for p in (op.pages if isinstance(op, Restore) else [op[1]])
            }
            with self._cond:
                readers = self._waiting + [c.forward for c in chunks]
                victims = self._retire([f for f in readers if broken & set(f.seq.page_ids)])
                self._running = [c for c in chunks if not c.forward.settled]
                kept = self._running
            self._settle(victims, error=exc)
            return kept
