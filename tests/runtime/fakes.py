"""A tiny deterministic engine with a byte tokenizer, for runtime tests that need no model.

Its "model" reads the real KV it keeps per (page, offset): the next token is a hash of every
token the position attends to, so a wrong page, a lost copy-on-write or a wrong mask changes
the output. It never samples the stop token, so generations run to max_tokens.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from pie.engine.errors import InvalidBatchError
from pie.engine.request import (
    DistributionResult,
    Entropy,
    EntropyResult,
    ForwardBatch,
    ForwardResult,
    LogitsResult,
    LogProbs,
    LogProbsResult,
    RawLogits,
    SampleResult,
    SequenceForward,
    TokenResult,
    TopKDistribution,
)
from tests.runtime.byte_tokenizer import OFFSET, ByteTokenizer


def next_token(visible: list[int]) -> int:
    """A printable ASCII byte that depends on every visible token and their order."""
    h = 7
    for t in visible:
        h = (h * 31 + t) % 1_000_003
    return OFFSET + 97 + h % 26  # 'a'..'z'


class FakeEngine:
    model_name = "fake-bytes"

    def __init__(self, num_pages: int = 64, page_size: int = 4, step_delay: float = 0.0) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.vocab_size = ByteTokenizer.vocab_size
        self.max_position = 4096
        self.tokenizer = ByteTokenizer()
        self.kv: dict[tuple[int, int], int] = {}
        self.batches: list[ForwardBatch] = []
        self.step_delay = step_delay
        self._lock = threading.Lock()

    def validate(self, seq: SequenceForward) -> None:
        n = len(seq.tokens)
        if n == 0 or len(seq.positions) != n:
            raise InvalidBatchError("bad token/position counts")
        if any(not 0 <= t < self.vocab_size for t in seq.tokens):
            raise InvalidBatchError("token outside the vocabulary")
        if len(seq.page_ids) * self.page_size < seq.context_len + n:
            raise InvalidBatchError("pages do not cover the slots")
        for index, _ in seq.outputs:
            if not 0 <= index < n:
                raise InvalidBatchError(f"output index {index} outside the {n} new tokens")

    def _slot(self, seq: SequenceForward, s: int) -> tuple[int, int]:
        return seq.page_ids[s // self.page_size], s % self.page_size

    def execute(self, batch: ForwardBatch) -> ForwardResult:
        import time

        for seq in batch.sequences:
            self.validate(seq)
        if self.step_delay:
            time.sleep(self.step_delay)
        with self._lock:
            self.batches.append(batch)
            outputs: list[list[SampleResult]] = []
            for seq in batch.sequences:
                for i, t in enumerate(seq.tokens):
                    self.kv[self._slot(seq, seq.context_len + i)] = t
                results: list[SampleResult] = []
                for index, spec in seq.outputs:
                    end = seq.context_len + index + 1
                    if seq.attention_mask is not None:
                        attend = np.asarray(seq.attention_mask[index])
                    else:
                        attend = np.ones(end, dtype=bool)
                    visible = [
                        self.kv[self._slot(seq, s)]
                        for s in range(end)
                        if s < len(attend) and attend[s]
                    ]
                    token = next_token(visible)
                    if seq.logit_mask is not None and not seq.logit_mask[token]:
                        token = int(np.flatnonzero(seq.logit_mask)[0])
                    results.append(self._result(spec, token))
                outputs.append(results)
        return ForwardResult(outputs)

    def _result(self, spec: object, token: int) -> SampleResult:
        if isinstance(spec, TopKDistribution):
            ids = [token + i for i in range(spec.k)]
            return DistributionResult(ids, [1.0 / spec.k] * spec.k)
        if isinstance(spec, LogProbs):
            return LogProbsResult([-1.0 if t == token else -5.0 for t in spec.token_ids])
        if isinstance(spec, Entropy):
            return EntropyResult(0.5)
        if isinstance(spec, RawLogits):
            row = torch.zeros(self.vocab_size)
            row[token] = 10.0
            return LogitsResult(row)
        return TokenResult(token)

    def save_pages(self, pages: list[int]) -> list[dict[int, int]]:
        return [{slot: t for (page, slot), t in self.kv.items() if page == p} for p in pages]

    def load_pages(self, pages: list[int], data: list[dict[int, int]]) -> None:
        for page, saved in zip(pages, data, strict=True):
            for slot in range(self.page_size):
                self.kv.pop((page, slot), None)
            for slot, t in saved.items():
                self.kv[(page, slot)] = t

    def copy_pages(self, pairs: list[tuple[int, int, int]]) -> None:
        with self._lock:
            for src, dst, n in pairs:
                for o in range(n):
                    if (src, o) in self.kv:
                        self.kv[(dst, o)] = self.kv[(src, o)]


def reference_generation(prompt: list[int], max_tokens: int) -> list[int]:
    """What a greedy generation of `max_tokens` from `prompt` yields on the fake engine."""
    seq = list(prompt)
    out = []
    for _ in range(max_tokens):
        token = next_token(seq)
        out.append(token)
        seq.append(token)
    return out
