"""The records an instance's host side hands the control plane, in plain Python types.

They are what crosses between a worker process and the control process (see
`runtime/workers/frames.py` for their wire form), and what `LocalControl` passes in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pie.engine.request import Greedy, Sample, SamplerSpec


@dataclass(slots=True)
class ForwardCall:
    """One `forward-args`: masks still run-length encoded (decoded by the control plane, which
    knows the context's length)."""

    tokens: list[int]
    positions: list[int] | None
    attention_mask: list[list[int]] | None  # per new token, run lengths hidden/visible/...
    logit_mask: list[int] | None  # run lengths banned/allowed/... over the vocabulary
    outputs: list[tuple[int, SamplerSpec]]


# Why a delegated generation ended (WIT `finish-reason`).
STOP_TOKEN, STOP_STRING, MAX_TOKENS, STOPPED = "stop-token", "stop-string", "max-tokens", "stopped"


@dataclass(frozen=True, slots=True)
class GenerateSpec:
    """A decode loop the host runs for the program: everything it decides, known up front.

    `tokens` run first and the last one's next-token distribution gives the first new token
    (the SDK's queued tokens). Each new token is run in turn until a stop token (included in
    `tokens` of the result, as the per-token loop includes it), a stop string (the text is cut
    before it), or `max_tokens`. The last new token is not run into the KV: the program queues
    it, exactly as after its own loop.
    """

    tokens: list[int]
    sampler: Greedy | Sample
    max_tokens: int
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    stream: bool = False  # send the text to the client as it is produced
    chunk_tokens: int = 0  # wake the program every this many tokens (0: only at the end)
    text: bool = False  # decode text (implied by stop strings and streaming)

    @property
    def decodes(self) -> bool:
        return self.text or self.stream or bool(self.stop_strings)


@dataclass(slots=True)
class GeneratedChunk:
    """New tokens since the last chunk, their confirmed text, and the reason once it ended."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None


def logits_array(logits: Any) -> np.ndarray:
    """A logit row (a torch tensor on any device, or an array) as a float32 numpy array."""
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float32)
