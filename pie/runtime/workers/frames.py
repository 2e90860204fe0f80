"""The messages between the control process and its worker processes, and their wire form.

A frame is a MessagePack array of messages (msgspec structs encoded as tagged arrays), sent
with a 4-byte length in front (`channel.py`). Batching is the point: a worker sends the
operations all its instances made in one turn as one frame, and the control process answers
each worker once per engine step. Values are plain: ints, strings, bytes, lists; tensors never
cross (a raw logit row crosses as float32 bytes).

    worker  ──Call/Ask/Tell/Submit/Withdraw/Ended──▶  control process
    worker  ◀──Done/Launch/Cancel/AddProgram/...───  control process
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from pie.engine.request import (
    DistributionResult,
    Entropy,
    EntropyResult,
    Greedy,
    LogitsResult,
    LogProbs,
    LogProbsResult,
    RawLogits,
    Sample,
    SampleResult,
    SamplerSpec,
    TokenResult,
    TopKDistribution,
)
from pie.runtime.calls import ForwardCall, GeneratedChunk, GenerateSpec, logits_array

PROTOCOL = 1


class _Msg(msgspec.Struct, array_like=True, tag=True):
    pass


# ---- worker → control process -------------------------------------------------------------------
class Call(_Msg):
    """A plane operation whose reply the instance waits for (`Done` with the same req)."""

    req: int
    owner: int
    op: str
    args: list[Any]


class Ask(_Msg):
    """A plane operation that returns a future (a receive, a pull, a generation chunk)."""

    req: int
    owner: int
    op: str
    args: list[Any]


class Tell(_Msg):
    """A plane operation with no reply (a send, a context made or closed, a subscription)."""

    owner: int
    op: str
    args: list[Any]


class Pass(msgspec.Struct, array_like=True, frozen=True):
    """One forward pass; `outputs` are [index, sampler] with samplers as `sampler_to_wire`."""

    req: int
    ctx: int
    tokens: list[int]
    positions: list[int] | None
    attention_mask: list[list[int]] | None
    logit_mask: list[int] | None
    outputs: list[list[Any]]


class Submit(_Msg):
    """Forward passes of one instance, queued together; each resolves its own req."""

    owner: int
    passes: list[Pass]


class Withdraw(_Msg):
    """The instance gave up a pending Ask (its future was discarded)."""

    req: int


class Ended(_Msg):
    """The instance ended; `ok` with its result text, else its error text."""

    owner: int
    ok: bool
    text: str


class Counters(_Msg):
    """The worker's counters, in answer to `CountersPlease`."""

    values: dict[str, float]


# ---- control process → worker -------------------------------------------------------------------
class Done(_Msg):
    """The value of a Call, Ask or forward Pass; `ok` False: `value` is the error text."""

    req: int
    ok: bool
    value: Any


class AddProgram(_Msg):
    hash: str
    name: str
    path: str  # the compiled component, serialized for this wasmtime version and config


class Launch(_Msg):
    owner: int
    program: str
    args: list[str]
    limits: dict[str, Any]  # InstanceLimits fields


class Cancel(_Msg):
    owner: int
    reason: str


class CountersPlease(_Msg):
    pass


class Shutdown(_Msg):
    pass


ToControl = Call | Ask | Tell | Submit | Withdraw | Ended | Counters
ToWorker = Done | AddProgram | Launch | Cancel | CountersPlease | Shutdown

ENCODER = msgspec.msgpack.Encoder()
TO_CONTROL = msgspec.msgpack.Decoder(list[ToControl])
TO_WORKER = msgspec.msgpack.Decoder(list[ToWorker])


# ---- values ----------------------------------------------------------------------------------------
def sampler_to_wire(spec: SamplerSpec) -> list[Any]:
    if isinstance(spec, Greedy):
        return ["greedy"]
    if isinstance(spec, Sample):
        return ["sample", spec.temperature, spec.top_k, spec.top_p, spec.min_p, spec.seed]
    if isinstance(spec, TopKDistribution):
        return ["distribution", spec.k, spec.temperature]
    if isinstance(spec, RawLogits):
        return ["raw-logits"]
    if isinstance(spec, LogProbs):
        return ["logprobs", list(spec.token_ids)]
    if isinstance(spec, Entropy):
        return ["entropy"]
    raise TypeError(f"not a sampler: {spec!r}")


def sampler_from_wire(value: list[Any]) -> SamplerSpec:
    tag = value[0]
    if tag == "greedy":
        return Greedy()
    if tag == "sample":
        t, k, p, m, seed = value[1:]
        return Sample(temperature=t, top_k=k, top_p=p, min_p=m, seed=seed)
    if tag == "distribution":
        return TopKDistribution(k=value[1], temperature=value[2])
    if tag == "raw-logits":
        return RawLogits()
    if tag == "logprobs":
        return LogProbs(tuple(value[1]))
    if tag == "entropy":
        return Entropy()
    raise ValueError(f"unknown sampler {tag!r}")


def call_to_wire(req: int, ctx: int, call: ForwardCall) -> Pass:
    outputs = [[i, sampler_to_wire(s)] for i, s in call.outputs]
    return Pass(
        req, ctx, call.tokens, call.positions, call.attention_mask, call.logit_mask, outputs
    )


def call_from_wire(p: Pass) -> ForwardCall:
    outputs = [(int(i), sampler_from_wire(s)) for i, s in p.outputs]
    return ForwardCall(p.tokens, p.positions, p.attention_mask, p.logit_mask, outputs)


def result_to_wire(result: SampleResult) -> Any:
    """A sampler result: an int for a token (the common case), else a tagged list."""
    if isinstance(result, TokenResult):
        return int(result.token_id)
    if isinstance(result, DistributionResult):
        return [
            "distribution",
            [int(t) for t in result.token_ids],
            [float(p) for p in result.probs],
        ]
    if isinstance(result, LogProbsResult):
        return ["logprobs", [float(v) for v in result.logprobs]]
    if isinstance(result, EntropyResult):
        return ["entropy", float(result.entropy)]
    if isinstance(result, LogitsResult):
        return ["logits", logits_array(result.logits).tobytes()]
    raise TypeError(f"no wire form for {type(result).__name__}")


def result_from_wire(value: Any) -> SampleResult:
    if isinstance(value, int):
        return TokenResult(value)
    tag = value[0]
    if tag == "distribution":
        return DistributionResult(value[1], value[2])
    if tag == "logprobs":
        return LogProbsResult(value[1])
    if tag == "entropy":
        return EntropyResult(value[1])
    if tag == "logits":
        return LogitsResult(np.frombuffer(value[1], dtype=np.float32))
    raise ValueError(f"unknown result {tag!r}")


def spec_to_wire(spec: GenerateSpec) -> list[Any]:
    return [
        spec.tokens,
        sampler_to_wire(spec.sampler),
        spec.max_tokens,
        sorted(spec.stop_tokens),
        list(spec.stop_strings),
        spec.stream,
        spec.chunk_tokens,
        spec.text,
    ]


def spec_from_wire(value: list[Any]) -> GenerateSpec:
    tokens, sampler, max_tokens, stops, strings, stream, chunk, text = value
    spec = sampler_from_wire(sampler)
    if not isinstance(spec, Greedy | Sample):
        raise ValueError("a delegated generation samples with greedy or sample only")
    return GenerateSpec(
        tokens, spec, max_tokens, frozenset(stops), tuple(strings), stream, chunk, text
    )


def chunk_to_wire(chunk: GeneratedChunk) -> list[Any]:
    return [chunk.tokens, chunk.text, chunk.finish]


def chunk_from_wire(value: list[Any]) -> GeneratedChunk:
    return GeneratedChunk(value[0], value[1], value[2])
