"""What the control layer needs from an engine: sizes, validation, one batched step, page copies.

The real `pie.engine.engine.Engine` satisfies it; so can a tensor-parallel executor or a fake in
tests. The control layer never imports torch and never sees a device, only this protocol.
"""

from __future__ import annotations

from typing import Protocol

from pie.engine.request import ForwardBatch, ForwardResult, SequenceForward


class EnginePort(Protocol):
    page_size: int  # slots per KV page
    num_pages: int  # pages in the KV pool
    vocab_size: int
    max_position: int  # RoPE positions must be < this (the model's context length)

    def validate(self, seq: SequenceForward) -> None:
        """Raise InvalidBatchError if `seq` cannot run; never changes state."""
        ...

    def execute(self, batch: ForwardBatch) -> ForwardResult:
        """One forward pass over the ragged batch and every requested sampler."""
        ...

    def copy_pages(self, pairs: list[tuple[int, int, int]]) -> None:
        """For each (src, dst, n_slots), copy the first n_slots of page src into page dst."""
        ...

    # Optional (preemption swaps pages out only where an engine has them):
    #   save_pages(pages) -> data: a host-memory copy of the pages' KV
    #   load_pages(pages, data): writes such a copy into (other) pages
