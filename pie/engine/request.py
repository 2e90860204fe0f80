"""What callers hand the engine and what it hands back, free of torch.

The control layer builds these records (it never imports torch); the engine validates and runs
them. Slots are the positions in a sequence's KV pages: slot s lives in page
`page_ids[s // page_size]` at offset `s % page_size`. Token positions (for RoPE) are explicit and
need not equal slots, which is what tree decoding and masked rollbacks need.

    page_ids:   [ p0 ........ | p1 ........ | p2 ..  ]
    slots:        0 .. ps-1     ps .. 2ps-1   2ps ..
                  └──── context_len filled ───┘└ new tokens appended here
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


# ---- samplers: one per requested output position -------------------------------------------
@dataclass(frozen=True, slots=True)
class Greedy:
    """Argmax token."""


@dataclass(frozen=True, slots=True)
class Sample:
    """Random token from the filtered distribution; `seed` makes it reproducible: the draw
    depends on the seed and the position of the token sampled from, not on the batch, so each
    step of a seeded generation draws anew and a rerun draws the same.

    Filters apply in vLLM's order: temperature, then top-k, top-p and min-p on the probabilities.
    top_k=0, top_p=1.0 and min_p=0.0 disable the respective filter. temperature 0 is greedy.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class TopKDistribution:
    """The k most probable tokens and their probabilities (after temperature)."""

    k: int
    temperature: float = 1.0


@dataclass(frozen=True, slots=True)
class RawLogits:
    """The full logit row, returned as a host tensor (it stays on the host side)."""


@dataclass(frozen=True, slots=True)
class LogProbs:
    """Log-probabilities (temperature 1) of the given token ids."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Entropy:
    """Entropy in nats of the next-token distribution (temperature 1)."""


SamplerSpec = Greedy | Sample | TopKDistribution | RawLogits | LogProbs | Entropy


# ---- results ---------------------------------------------------------------------------------
class TokenResult(NamedTuple):
    token_id: int


class DistributionResult(NamedTuple):
    token_ids: list[int]
    probs: list[float]


class LogProbsResult(NamedTuple):
    logprobs: list[float]


class EntropyResult(NamedTuple):
    entropy: float


class LogitsResult(NamedTuple):
    logits: object  # a 1-D float32 torch.Tensor on the CPU; typed loosely to keep torch out


SampleResult = TokenResult | DistributionResult | LogProbsResult | EntropyResult | LogitsResult


# ---- one sequence's share of a forward batch ----------------------------------------------------
@dataclass(slots=True)
class SequenceForward:
    """New tokens of one sequence, appended after `context_len` filled slots.

    tokens[i] is written to slot context_len + i at RoPE position positions[i]. `page_ids` must
    cover slots 0 .. context_len + len(tokens) - 1. Without `attention_mask`, new token i attends
    to slots 0 .. context_len + i (causal). With it, a bool array [len(tokens), context_len +
    len(tokens)] says which slots each new token attends to (True = attend); a token must attend
    to at least one slot. `outputs` pairs an index into `tokens` with the sampler to apply to the
    next-token distribution at that index. `logit_mask`, a bool array [vocab] (True = allowed),
    restricts every output of this sequence.
    """

    tokens: list[int]
    positions: list[int]
    page_ids: list[int]
    context_len: int
    outputs: list[tuple[int, SamplerSpec]] = field(default_factory=list)
    attention_mask: np.ndarray | None = None
    logit_mask: np.ndarray | None = None


@dataclass(slots=True)
class ForwardBatch:
    """A ragged batch: any mix of prefill chunks and single-token decodes."""

    sequences: list[SequenceForward]


@dataclass(slots=True)
class ForwardResult:
    """Per sequence, the sampler results in the order of its `outputs`."""

    outputs: list[list[SampleResult]]
