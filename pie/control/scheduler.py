"""The batch scheduler: gathers forwards from all inferlets into engine steps on one thread.

Work-conserving: a lone forward runs at once; forwards arriving while a step runs gather into
the next. Each step runs pending copy-on-write page copies, then one engine.execute over a batch
planned under a token budget (see batching.py), then resolves the futures.

One refinement keeps decoders in phase. The contexts a step just answered are about to send
their next forward (a decode loop turns around in about a millisecond per instance), so
the next step waits for them, but only while they keep coming: at most `gather_gap_s` (and
never more than the last step took: missing a step costs a straggler one step) after the step
ended or after the last of them arrived. Without it, N decoders split into a step of one and a
step of N-1 and stay split, doubling the steps. A lone decoder never waits (it is the only one
answered, and its forward is already queued), nor does a step the queue already fills.

A forward that finds the page pool short does not fail at once: it waits in a queue for pages
(higher priority first, then first come first served; a newcomer that needs pages queues
behind the waiters, so a stream of small requests cannot starve a big one), is admitted when
pages free up, and fails with the pool's error after `page_wait_s`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import cast

from pie.control.batching import Chunk, PendingForward, plan_batch, resolve
from pie.control.context import ContextManager, KvContext
from pie.control.engine_port import EnginePort
from pie.control.errors import (
    ControlError,
    ForwardCancelledError,
    InvalidRequestError,
    PoolExhaustedError,
    SchedulerStoppedError,
)
from pie.control.forward import ForwardRequest, build_sequence, check_request
from pie.control.pacing import DECODE_LATENCY_FACTOR, LONG_PROMPT_STEPS, PrefillPacer
from pie.control.page_ops import PageOp, PageOps, PageRead
from pie.control.page_waits import PageWaiting, PageWaitQueue
from pie.control.prefix_cache import PrefixCache, plain, served
from pie.engine.errors import EngineError
from pie.engine.request import ForwardBatch, SampleResult


@dataclass(frozen=True, slots=True)
class StepInfo:
    """One engine step, as step listeners see it."""

    sequences: int  # sequences (chunks) in the batch
    tokens: int  # tokens run
    seconds: float  # time inside the engine


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    steps: int  # engine steps run
    forwards: int  # forwards completed with results
    tokens: int  # tokens run through the engine
    mean_sequences_per_step: float
    mean_tokens_per_step: float
    queue_depth: int  # forwards waiting (or partly run) now
    page_waits: int  # forwards waiting for KV pages now
    gather_seconds: float  # engine time spent waiting for answered contexts to come back


class BatchScheduler(PageWaiting, PageOps):
    """Owns the engine thread. Submit from any thread; results arrive through futures."""

    def __init__(
        self,
        engine: EnginePort,
        max_batch_tokens: int = 512,
        max_batch_sequences: int = 256,
        decode_tokens: int = 16,
        gather_gap_s: float = 0.01,
        page_wait_s: float = 60.0,
        decode_latency_factor: float | None = DECODE_LATENCY_FACTOR,
        long_prompt_tokens: int | None = None,
        max_swapped_pages: int | None = None,
    ) -> None:
        for name, value in [
            ("max_batch_tokens", max_batch_tokens),
            ("max_batch_sequences", max_batch_sequences),
            ("decode_tokens", decode_tokens),
        ]:
            if value < 1:
                raise InvalidRequestError(f"{name} must be at least 1, got {value}")
        if gather_gap_s < 0:
            raise InvalidRequestError(f"gather_gap_s must be 0 or more, got {gather_gap_s}")
        if page_wait_s < 0:
            raise InvalidRequestError(f"page_wait_s must be 0 or more, got {page_wait_s}")
        self.engine = engine
        self.page_size = engine.page_size
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_sequences = max_batch_sequences
        self.decode_tokens = decode_tokens  # forwards this short go first (decodes)
        # 0: never wait for answered contexts. The default is two GIL switch intervals: a
        # runnable inferlet thread has had its turn by then.
        self.gather_gap_s = gather_gap_s
        self._contexts: ContextManager | None = None
        self._cond = threading.Condition()
        self._waiting: list[PendingForward] = []  # FCFS; partly run forwards keep their place
        self._running: list[Chunk] = []  # the step now inside the engine
        self._copies: list[PageOp] = []
        self._unsettled: dict[KvContext, int] = {}  # forwards per context not yet settled
        # Contexts the last step answered that have not sent their next forward yet, and when
        # the last of them came back (or the step ended): see the module docstring.
        self._answered: set[KvContext] = set()
        self._last_return = 0.0
        self._last_step_s = 0.0  # how long the last engine step took
        self._gathered = 0.0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._step_listeners: list[Callable[[StepInfo | None], None]] = []
        self._steps = self._forwards = self._tokens = self._sequences = 0
        # Forwards waiting for pages (see the module docstring); 0 s: fail at once instead.
        self.page_wait_s = page_wait_s
        self._page_waits = PageWaitQueue()
        # Pages came free, or a waiter arrived (the engine thread's wait must learn its
        # deadline), since the page waiters were last tried.
        self._retry_pages = False
        self._priority: dict[int, int] = {}  # owner -> priority (default 0)
        # Host memory for pages swapped out by preemption, in pages (default: the pool's size;
        # 0: no preemption), and how many pages preemption has swapped out so far.
        self.max_swapped_pages = (
            engine.num_pages if max_swapped_pages is None else max_swapped_pages
        )
        self.preempted_pages = 0
        self.prefix_cache: PrefixCache | None = None  # set by the runtime when caching is on
        # Prompts longer than `long_prompt_tokens` (default: four steps' budget) go beside
        # decoders at a pace that keeps their steps within `decode_latency_factor` times a
        # decode-only step (None: the token budget alone); see pacing.py.
        self.pacer = PrefillPacer(decode_latency_factor)
        self.long_prompt_tokens = (
            LONG_PROMPT_STEPS * max_batch_tokens
            if long_prompt_tokens is None
            else long_prompt_tokens
        )

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._stopping:
                raise SchedulerStoppedError("the scheduler was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="pie-batch-scheduler", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        """Fail every forward not yet run, let the running step finish, end the thread."""
        with self._cond:
            self._stopping = True
            victims = self._retire(self._waiting)
            waits = self._drop_page_waits(None)
            reads = [op for op in self._copies if isinstance(op, PageRead)]
            self._cond.notify_all()  # wake the engine thread even with nothing queued
        stopped = SchedulerStoppedError("the scheduler stopped before it ran")
        for read in reads:
            if read.future.set_running_or_notify_cancel():
                read.future.set_exception(stopped)
        self._settle(victims, error=stopped)
        for wait in waits:
            resolve(wait.future, None, stopped)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def add_step_listener(self, listener: Callable[[StepInfo | None], None]) -> None:
        """Calls `listener(step)` on the engine thread after each step's futures are resolved
        (a process boundary sends the step's answers in one message from there; metrics count
        the step). `step` is None after a round that only copied pages, or a crash."""
        self._step_listeners.append(listener)

    def bind_contexts(self, contexts: ContextManager) -> None:
        if self._contexts is not None and self._contexts is not contexts:
            raise ControlError("this scheduler already serves another ContextManager")
        if self._contexts is None:
            contexts.pool.add_free_listener(self._on_pages_freed)
        self._contexts = contexts

    def set_priority(self, owner: int, priority: int) -> None:
        """Rank of `owner`'s forwards in the wait for pages (higher first; default 0)."""
        with self._cond:
            if priority:
                self._priority[owner] = priority
            else:
                self._priority.pop(owner, None)

    # ---- calls from inferlet threads ----------------------------------------------------------
    def submit(self, request: ForwardRequest) -> Future[list[SampleResult]]:
        """Reserve the forward's slots and queue it; problems come back through the future."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[ForwardRequest]) -> list[Future[list[SampleResult]]]:
        """`submit` for each request in order, queued at once so they can share one step (an
        early step never takes the first of a group of forks and leaves the rest)."""
        futures: list[Future[list[SampleResult]]] = []
        admitted: list[PendingForward] = []
        for request in requests:
            future: Future[list[SampleResult]] = Future()
            futures.append(future)
            try:
                if self._behind_page_waiters(request):
                    self._wait_for_pages(request, future)
                else:
                    admitted.append(self._admit(request, future))
            except PoolExhaustedError as exc:
                if self.page_wait_s > 0 and self._others_could_free(request):
                    self._wait_for_pages(request, future)
                else:
                    future.set_exception(exc)
            except (ControlError, EngineError) as exc:
                future.set_exception(exc)
        self._enqueue(admitted)
        return futures

    def _enqueue(self, admitted: list[PendingForward], counted: bool = False) -> None:
        """Queues admitted forwards for the next steps (`counted`: already in `_unsettled`,
        as forwards that waited for pages are)."""
        if not admitted:
            return
        with self._cond:
            if not self._stopping:
                for forward in admitted:
                    ctx = forward.context
                    self._waiting.append(forward)
                    if not counted:
                        self._unsettled[ctx] = self._unsettled.get(ctx, 0) + 1
                    if ctx in self._answered:
                        self._answered.discard(ctx)
                        self._last_return = time.monotonic()
                self._cond.notify_all()
                return
        for forward in admitted:
            forward.future.set_exception(
                SchedulerStoppedError("the scheduler stopped; the forward won't run")
            )

    def cancel_owner(self, owner: int) -> int:
        """Fail `owner`'s queued forwards and wait until none of its forwards is in the engine.

        Returns how many were cancelled. Afterwards its pages can be freed safely.
        """
        with self._cond:
            victims = self._retire([f for f in self._waiting if f.context.owner == owner])
            waits = self._drop_page_waits(owner)
            self._priority.pop(owner, None)
            self._answered = {c for c in self._answered if c.owner != owner}
            self._cond.notify_all()  # a gathering step stops waiting for this owner
        cancelled = ForwardCancelledError(f"instance {owner} was cancelled")
        self._settle(victims, error=cancelled)
        for wait in waits:
            resolve(wait.future, None, cancelled)
        with self._cond:
            if threading.current_thread() is not self._thread:  # a future callback: step is over
                self._cond.wait_for(
                    lambda: all(c.forward.context.owner != owner for c in self._running)
                )
        return len(victims)

    def wait_idle(self, ctx: KvContext) -> None:
        """Return once no forward of `ctx` is queued or inside the engine."""

        def idle() -> bool:
            return ctx not in self._unsettled and all(
                c.forward.context is not ctx for c in self._running
            )

        with self._cond:
            if idle():
                return
            if threading.current_thread() is self._thread:
                raise ControlError(
                    "cannot wait for a busy context on the engine thread (a future callback); "
                    "wait from the inferlet's thread"
                )
            if self._thread is None:
                raise ControlError("forwards are queued but the scheduler is not running; start()")
            self._cond.wait_for(idle)

    @property
    def stats(self) -> SchedulerStats:
        with self._cond:
            steps = max(self._steps, 1)
            return SchedulerStats(
                steps=self._steps,
                forwards=self._forwards,
                tokens=self._tokens,
                mean_sequences_per_step=self._sequences / steps,
                mean_tokens_per_step=self._tokens / steps,
                queue_depth=len(self._waiting),
                page_waits=len(self._page_waits),
                gather_seconds=self._gathered,
            )

    # ---- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        """The hub: wait for work, run CoW copies, one engine step, resolve its futures."""
        try:
            while True:
                self._retry_page_waits()
                work = self._next_work()
                if work is None:
                    break
                copies, chunks = work
                if not copies and not chunks:
                    continue  # woken for the page waiters only
                if copies:
                    chunks = self._copy_pages(copies, chunks)
                error = self._execute(chunks) if chunks else None
                self._finish_step(chunks, error)
                step = None
                if chunks:
                    tokens = sum(len(c.seq.tokens) for c in chunks)
                    step = StepInfo(len(chunks), tokens, self._last_step_s)
                for listener in self._step_listeners:
                    listener(step)
        except BaseException as exc:  # a bug here must not leave futures waiting forever
            with self._cond:
                self._stopping = True
                victims = self._retire(self._waiting + [c.forward for c in self._running])
                self._running = []
            self._settle(victims, error=ControlError(f"the batch scheduler crashed: {exc!r}"))
            for listener in self._step_listeners:
                listener(None)
            raise

    def _next_work(self) -> tuple[list[PageOp], list[Chunk]] | None:
        """Block until there is work; take the queued copies and plan the next batch."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._waiting or self._copies or self._stopping or self._retry_pages,
                timeout=self._page_waits.next_deadline(),
            )
            if not (self._waiting or self._copies or self._stopping):
                return [], []  # pages came free, or a page waiter's deadline passed
            self._gather()
            if self._stopping:
                return None
            # Copies and batch are taken together: a forward's CoW copy was queued before the
            # forward itself, so it runs in this round or an earlier one, never after.
            copies, self._copies = self._copies, []
            chunks = plan_batch(
                self._waiting,
                self.max_batch_tokens,
                self.max_batch_sequences,
                self.decode_tokens,
                self.pacer.prefill_tokens(
                    any(f.remaining <= self.decode_tokens for f in self._waiting)
                ),
                self.long_prompt_tokens,
            )
            assert chunks or not self._waiting, "plan_batch stalled on a non-empty queue"
            self._waiting = [f for f in self._waiting if f.remaining > 0]
            self._running = chunks
            return copies, chunks

    def _gather(self) -> None:
        """Wait (lock held) while the contexts the last step answered keep coming back."""
        began = time.monotonic()
        gap = min(self.gather_gap_s, self._last_step_s)
        while self._waiting and not self._stopping and not self._full():
            if not any(not ctx.closed for ctx in self._answered):
                break
            left = self._last_return + gap - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        self._answered.clear()  # late ones join a later step: wait for each at most once
        self._gathered += time.monotonic() - began

    def _full(self) -> bool:
        """Whether the queue already fills a step: waiting longer cannot make it bigger.
        While decoders are active long prompts go at the pace, so they do not fill it."""
        paced = self.pacer.pacing()
        long = self.long_prompt_tokens
        queued = sum(f.remaining for f in self._waiting if not (paced and len(f.seq.tokens) > long))
        if queued >= self.max_batch_tokens:
            return True
        return len({f.context for f in self._waiting}) >= self.max_batch_sequences

    def _execute(self, chunks: list[Chunk]) -> Exception | None:
        """One engine step; stores each chunk's outputs, or returns the error that failed it."""
        began = time.monotonic()
        try:
            result = self.engine.execute(ForwardBatch([c.seq for c in chunks]))
            self._last_step_s = time.monotonic() - began
            decodes = [len(c.forward.seq.tokens) <= self.decode_tokens for c in chunks]
            prefill = sum(len(c.seq.tokens) for c, d in zip(chunks, decodes, strict=True) if not d)
            self.pacer.observe(sum(decodes), prefill, self._last_step_s)
            counts = [len(outs) for outs in result.outputs]
            if counts != [len(c.out_slots) for c in chunks]:
                raise ControlError(f"the engine broke its contract: output counts {counts}")
        except Exception as exc:
            return exc
        for chunk, outs in zip(chunks, result.outputs, strict=True):
            for slot, out in zip(chunk.out_slots, outs, strict=True):
                chunk.forward.results[slot] = out
        return None

    def _finish_step(self, chunks: list[Chunk], error: Exception | None) -> None:
        if self.prefix_cache is not None:
            self._offer_pages([c.forward for c in chunks if c.last], error)
        with self._cond:
            self._running = []
            if chunks:
                self._steps += 1
                self._sequences += len(chunks)
                self._tokens += sum(len(c.seq.tokens) for c in chunks)
            ended = [c.forward for c in chunks if c.last or error is not None]
            finished = self._retire(ended)
            if error is None:
                self._forwards += len(finished)
                # Set before the futures resolve: an answered context may resubmit at once.
                self._answered = {f.context for f in finished if f.context not in self._unsettled}
                self._last_return = time.monotonic()
        if error is not None:
            self._settle(finished, error=error)
            return
        for forward in finished:  # every output slot was filled by one of its chunks
            resolve(forward.future, cast(list[SampleResult], forward.results), None)

    def _offer_pages(self, forwards: list[PendingForward], error: Exception | None) -> None:
        """The full pages finished forwards wrote go to the prefix cache; a failed forward's
        context is never offered again (its slots hold no KV)."""
        assert self.prefix_cache is not None
        for forward in forwards:
            ctx = forward.context
            if error is not None:
                ctx.tokens = None
            tokens = ctx.tokens
            if tokens is None or ctx.swapped is not None or ctx.closed:
                continue
            end = forward.seq.context_len + len(forward.seq.tokens)
            if end // self.page_size > len(ctx.cache_keys):
                pages = ctx.pages[: end // self.page_size]
                ctx.cache_keys += self.prefix_cache.offer(tokens[:end], pages, ctx.cache_keys)

    # ---- bookkeeping (lock held) --------------------------------------------------------------
    def _retire(self, forwards: Iterable[PendingForward]) -> list[PendingForward]:
        """Mark forwards settled and drop them from the queue and the per-context counts.

        Returns those not settled before; the caller resolves their futures after the lock.
        """
        fresh = [f for f in forwards if not f.settled]
        for forward in fresh:
            forward.settled = True
            if self._contexts is not None:
                self._contexts.settled(forward.context)
            left = self._unsettled.pop(forward.context) - 1
            if left:
                self._unsettled[forward.context] = left
        if fresh:
            gone = set(fresh)
            self._waiting = [f for f in self._waiting if f not in gone]
            self._cond.notify_all()
        return fresh

    @staticmethod
    def _settle(forwards: list[PendingForward], error: BaseException) -> None:
        for forward in forwards:
            resolve(forward.future, None, error)

    def _admit(self, request: ForwardRequest, future: Future[list[SampleResult]]) -> PendingForward:
        """Check the request, reserve its slots and snapshot what it reads; undo on rejection."""
        if self._stopping:
            raise SchedulerStoppedError("the scheduler stopped; the forward won't run")
        contexts = self._contexts
        if contexts is None:
            raise ControlError("no ContextManager uses this scheduler; create one with it first")
        check_request(request)
        asked = request
        if self.prefix_cache is not None:  # an empty context may start on cached pages
            request = served(self.prefix_cache, contexts, request)
        ctx, n = request.context, len(request.tokens)
        try:
            start, pages = contexts.reserve(ctx, n, request.tokens if plain(request) else None)
        except BaseException:
            if request is not asked:
                contexts.unadopt(ctx)
            raise
        try:
            seq, splittable = build_sequence(
                request, start, pages, contexts.hidden_before(ctx, start)
            )
            if not splittable and n > self.max_batch_tokens:
                raise InvalidRequestError(
                    f"a forward of {n} tokens whose mask looks ahead cannot be split into "
                    f"batches of {self.max_batch_tokens}; send fewer tokens per forward"
                )
            self.engine.validate(seq)
        except BaseException:
            contexts.unreserve(ctx, start, start + n)
            if request is not asked:  # refused: the context is as empty as it was asked on
                contexts.unadopt(ctx)
            raise
        return PendingForward(seq, ctx, future, splittable, [None] * len(seq.outputs))
