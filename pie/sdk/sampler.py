"""Samplers: what to compute from the next-token distribution at one output position.

Plain frozen dataclasses; `to_wit` gives the binding value. Token samplers (Greedy, Sample)
yield an int; the others yield a reduction, so the vocabulary-sized row stays on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pie.sdk._wit import call, forward


@dataclass(frozen=True)
class Greedy:
    """The most probable token."""

    def to_wit(self) -> Any:
        return forward.Sampler_Greedy()


@dataclass(frozen=True)
class Sample:
    """A random token after temperature, top-k, top-p and min-p (0 / 1.0 / 0.0 switch a filter off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def to_wit(self) -> Any:
        params = forward.SampleParams(
            float(self.temperature),
            int(self.top_k),
            float(self.top_p),
            float(self.min_p),
            self.seed,
        )
        return forward.Sampler_Sample(params)


@dataclass(frozen=True)
class TopK:
    """The k most probable tokens and their probabilities: yields a `Distribution`."""

    k: int
    temperature: float = 1.0

    def to_wit(self) -> Any:
        return forward.Sampler_Distribution(
            forward.DistributionParams(int(self.k), float(self.temperature))
        )


@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of the given tokens: yields a list of floats."""

    tokens: tuple[int, ...]

    def to_wit(self) -> Any:
        return forward.Sampler_Logprobs(list(self.tokens))


@dataclass(frozen=True)
class Entropy:
    """Entropy (nats) of the next-token distribution: yields a float."""

    def to_wit(self) -> Any:
        return forward.Sampler_Entropy()


@dataclass(frozen=True)
class RawLogits:
    """The full logit row, kept on the host: yields a `Logits` handle."""

    def to_wit(self) -> Any:
        return forward.Sampler_RawLogits()


Sampler = Greedy | Sample | TopK | Logprobs | Entropy | RawLogits


@dataclass(frozen=True)
class Distribution:
    """Result of `TopK`: the k most probable tokens, by descending probability."""

    tokens: list[int]
    """Token ids, most probable first; fewer than k where a logit mask allows fewer."""
    probs: list[float]
    """Their probabilities in the softmax over the whole vocabulary at the `TopK`'s
    temperature (not renormalized over the k), in the same order."""


class Logits:
    """Result of `RawLogits`: a host-side logit row; ask it for reductions, then `release()`."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def top_k(self, k: int) -> tuple[list[int], list[float]]:
        tokens, values = call(forward.logits_top_k, self.handle, k)
        return list(tokens), list(values)

    def values(self, tokens: list[int]) -> list[float]:
        return list(call(forward.logits_values, self.handle, list(tokens)))

    def release(self) -> None:
        call(forward.logits_release, self.handle)


def from_wit(output: Any) -> Any:
    """The SDK value of one `forward.output`."""
    if isinstance(output, forward.Output_Token):
        return output.value
    if isinstance(output, forward.Output_Distribution):
        tokens, probs = output.value
        return Distribution(list(tokens), list(probs))
    if isinstance(output, forward.Output_Logits):
        return Logits(output.value)
    return output.value  # logprobs (list of floats) or entropy (float)
