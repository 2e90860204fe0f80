"""Test doubles for the control layer: an engine whose KV cache is a dict of token ids.

FakeEngine writes each new token into its slot and answers samplers from what the output
position attends to: Greedy -> (last visible token + 1) % vocab, RawLogits -> the visible tokens
themselves, so a test can assert exactly what each sequence reads (forks, CoW, masks included).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from pie.control import BatchScheduler, ContextManager, ExportRegistry, KvContext, PagePool
from pie.engine.errors import InvalidBatchError
from pie.engine.request import (
    ForwardBatch,
    ForwardResult,
    LogitsResult,
    RawLogits,
    SampleResult,
    SequenceForward,
    TokenResult,
)

UNWRITTEN = -1  # what a read of a never-written slot returns


class FakeEngine:
    """Implements EnginePort. `hold()` makes the next execute block until `release()`;
    `step_seconds` makes every step take at least that long, like a real forward."""

    def __init__(
        self,
        num_pages: int = 32,
        page_size: int = 4,
        vocab_size: int = 1000,
        max_position: int = 8192,
        poison: int | None = None,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.vocab_size = vocab_size
        self.max_position = max_position
        self.poison = poison  # execute raises RuntimeError for a batch holding this token
        self.kv: dict[tuple[int, int], int] = {}  # (page, offset) -> token id
        self.batches: list[ForwardBatch] = []  # every batch that ran, in order
        self.copies: list[tuple[int, int, int]] = []
        self.steps_entered: queue.Queue[ForwardBatch] = queue.Queue()
        self.step_seconds = 0.0
        self._gate = threading.Event()
        self._gate.set()

    # ---- test controls ------------------------------------------------------------------------
    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def wait_step(self) -> ForwardBatch:
        """Block until a step has entered execute; returns its batch."""
        return self.steps_entered.get(timeout=10)

    def read(self, page_ids: list[int], slots: range | list[int]) -> list[int]:
        ps = self.page_size
        return [self.kv.get((page_ids[s // ps], s % ps), UNWRITTEN) for s in slots]

    # ---- EnginePort ---------------------------------------------------------------------------
    def validate(self, seq: SequenceForward) -> None:
        n, length = len(seq.tokens), seq.context_len + len(seq.tokens)
        if n == 0 or len(seq.positions) != n:
            raise InvalidBatchError("tokens and positions must be non-empty and equal in length")
        if not all(0 <= t < self.vocab_size for t in seq.tokens):
            raise InvalidBatchError(f"token id outside the vocabulary [0, {self.vocab_size})")
        if not all(0 <= p < self.max_position for p in seq.positions):
            raise InvalidBatchError(
                f"position outside the model's context [0, {self.max_position})"
            )
        pages = seq.page_ids[: -(-length // self.page_size)]
        if len(pages) * self.page_size < length or len(set(pages)) != len(pages):
            raise InvalidBatchError(f"pages {seq.page_ids} cannot hold {length} slots")
        if not all(0 <= p < self.num_pages for p in pages):
            raise InvalidBatchError("page id outside the pool")
        mask = seq.attention_mask
        if mask is not None and (mask.shape != (n, length) or not mask.any(axis=1).all()):
            raise InvalidBatchError(f"attention_mask must be [{n}, {length}] with a True per row")
        if not all(0 <= i < n for i, _ in seq.outputs):
            raise InvalidBatchError("output index outside the new tokens")

    def execute(self, batch: ForwardBatch) -> ForwardResult:
        self.steps_entered.put(batch)
        if not self._gate.wait(timeout=10):
            raise RuntimeError("the test never released the held engine")
        if self.step_seconds:
            time.sleep(self.step_seconds)
        for seq in batch.sequences:
            self.validate(seq)
        written = [
            (seq.page_ids[s // self.page_size], s % self.page_size)
            for seq in batch.sequences
            for s in range(seq.context_len, seq.context_len + len(seq.tokens))
        ]
        if len(set(written)) != len(written):
            raise InvalidBatchError("two new tokens in the batch would write the same KV slot")
        if self.poison is not None and any(self.poison in s.tokens for s in batch.sequences):
            raise RuntimeError("poisoned batch")
        self.batches.append(batch)
        # Like a real forward: every new token's K/V is written before any attention reads.
        for seq in batch.sequences:
            for i, token in enumerate(seq.tokens):
                slot = seq.context_len + i
                self.kv[(seq.page_ids[slot // self.page_size], slot % self.page_size)] = token
        return ForwardResult([self._answer(seq) for seq in batch.sequences])

    def save_pages(self, pages: list[int]) -> list[dict[int, int]]:
        return [{slot: t for (page, slot), t in self.kv.items() if page == p} for p in pages]

    def load_pages(self, pages: list[int], data: list[dict[int, int]]) -> None:
        for page, saved in zip(pages, data, strict=True):
            for slot in range(self.page_size):
                self.kv.pop((page, slot), None)
            for slot, t in saved.items():
                self.kv[(page, slot)] = t

    def copy_pages(self, pairs: list[tuple[int, int, int]]) -> None:
        self.copies.extend(pairs)
        for src, dst, n in pairs:
            for offset in range(n):
                self.kv[(dst, offset)] = self.kv.get((src, offset), UNWRITTEN)

    # ---- internals ----------------------------------------------------------------------------
    def _answer(self, seq: SequenceForward) -> list[SampleResult]:
        results: list[SampleResult] = []
        for index, spec in seq.outputs:
            if seq.attention_mask is None:
                slots: range | list[int] = range(seq.context_len + index + 1)
            else:
                slots = [int(s) for s in np.flatnonzero(seq.attention_mask[index])]
            seen = self.read(seq.page_ids, slots)
            if isinstance(spec, RawLogits):
                results.append(LogitsResult(tuple(seen)))
            else:
                results.append(TokenResult((seen[-1] + 1) % self.vocab_size))
        return results


class RecordingSink:
    """A CopySink for context tests without a scheduler: records copies and idle waits."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.copies: list[tuple[int, int, int]] = []
        self.idle_waits: list[int] = []  # context ids, in call order
        self.contexts: ContextManager | None = None

    def queue_copies(self, pairs: list[tuple[int, int, int]]) -> None:
        self.copies.extend(pairs)

    def wait_idle(self, ctx: KvContext) -> None:
        self.idle_waits.append(ctx.id)

    def bind_contexts(self, contexts: ContextManager) -> None:
        self.contexts = contexts


@dataclass
class Bench:
    """Pool, exports and contexts over a RecordingSink (no scheduler)."""

    pool: PagePool
    exports: ExportRegistry
    sink: RecordingSink
    contexts: ContextManager


def build_bench(num_pages: int, page_size: int) -> Bench:
    pool = PagePool(num_pages)
    exports = ExportRegistry(pool)
    sink = RecordingSink(page_size)
    return Bench(pool, exports, sink, ContextManager(pool, exports, sink))


@dataclass
class Stack:
    """The whole control layer over a FakeEngine."""

    engine: FakeEngine
    pool: PagePool
    exports: ExportRegistry
    scheduler: BatchScheduler
    contexts: ContextManager


def build_stack(engine: FakeEngine, scheduler: BatchScheduler) -> Stack:
    pool = PagePool(engine.num_pages)
    exports = ExportRegistry(pool)
    return Stack(engine, pool, exports, scheduler, ContextManager(pool, exports, scheduler))
