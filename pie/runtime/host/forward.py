"""Host side of the `forward` interface: submit forward passes, take their outputs, reduce raw
logit rows kept on the host, and hand whole decode loops to the host (`generate`).

What can be judged here is checked here (handles, sizes, positions, the logit mask); the control
plane decodes the run-length masks against the context's length and admits the pass, and what
it refuses fails the pass's future (the guest sees the error when it takes the outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pie.engine.request import Greedy, LogitsResult, Sample, SampleResult
from pie.runtime.calls import ForwardCall, GeneratedChunk, GenerateSpec, logits_array
from pie.runtime.errors import GUEST_ERRORS, HostError
from pie.runtime.host import futures, kv
from pie.runtime.host.state import InstanceHost

LOGITS = "logits"
GENERATION = "generation"
MAX_LOGITS = 64  # raw logit rows one instance may hold at once (each is vocab floats)
MAX_STOP_STRINGS = 64
MAX_STOP_STRING = 1024  # characters


@dataclass(frozen=True, slots=True)
class LogitsRef:
    """A `RawLogits` output: the handle of a row kept on the host."""

    handle: int


def check_call(host: InstanceHost, call: ForwardCall) -> None:
    """Raises HostError for what is wrong with `call` whatever context it goes to."""
    model = host.services.model
    n = len(call.tokens)
    if not 1 <= n <= model.max_position:
        raise HostError(f"a forward takes 1 to {model.max_position} tokens, got {n}")
    if call.positions is not None:
        if len(call.positions) != n:
            raise HostError(f"{n} tokens but {len(call.positions)} positions")
        if max(call.positions) >= model.max_position:
            raise HostError(
                f"position {max(call.positions)} is past the model's context "
                f"({model.max_position} positions)"
            )
    if len(call.outputs) > n * 4:
        raise HostError(f"{len(call.outputs)} outputs for {n} tokens; at most {n * 4}")
    for index, _ in call.outputs:
        if not 0 <= index < n:
            raise HostError(f"output index {index} is outside the {n} new tokens")
    if call.attention_mask is not None and len(call.attention_mask) != n:
        raise HostError(f"attention mask has {len(call.attention_mask)} rows for {n} tokens")
    if call.logit_mask is not None:
        runs = call.logit_mask
        if sum(runs) != model.vocab_size:
            raise HostError(
                f"logit mask: run lengths must be non-negative and sum to {model.vocab_size}, "
                f"got sum {sum(runs)}"
            )
        if not any(runs[1::2]):  # no token could be sampled: refuse before it reaches a batch
            raise HostError("the logit mask bans every token; allow at least one")


def execute(host: InstanceHost, handle: int, call: ForwardCall) -> int:
    result = execute_many(host, [(handle, call)])[0]
    if isinstance(result, str):
        raise HostError(result)
    return result


def execute_many(host: InstanceHost, passes: list[tuple[int, ForwardCall]]) -> list[int | str]:
    """Submits the passes together, in order; per pass a future handle or an error message.

    They reach the scheduler in one call, so no step can start between two of them.
    """
    results: list[int | str] = []
    checked: list[tuple[int, ForwardCall]] = []
    # Each pass needs a free handle, checked before it is submitted: a forward submitted
    # without one could never be taken.
    room = host.handles.limit - len(host.handles)
    for handle, call in passes:
        try:
            if len(checked) >= room:
                raise HostError(
                    f"open-handle limit reached ({host.handles.limit}): take or discard futures"
                )
            check_call(host, call)
            checked.append((kv.get(host, handle), call))
            results.append(len(checked) - 1)
        except GUEST_ERRORS as e:
            results.append(str(e) or type(e).__name__)
    submitted = host.control.submit(checked) if checked else []
    for i, result in enumerate(results):
        if isinstance(result, int):
            results[i] = futures.add(host, "forward", submitted[result], checked[result][0])
    return results


def execute_wait(
    host: InstanceHost, handle: int, call: ForwardCall
) -> list[SampleResult | LogitsRef]:
    """`execute`, a wait for that pass alone, then its `outputs`: one host call per step."""
    fid = execute(host, handle, call)
    pending = host.handles.get(futures.KIND, fid).future
    while not pending.done():
        host.wait([pending], None)  # wakes early only to trap a stopped instance
    return outputs(host, fid)


def outputs(host: InstanceHost, handle: int) -> list[SampleResult | LogitsRef]:
    results: list[SampleResult] = futures.take(host, handle, "forward")
    out: list[SampleResult | LogitsRef] = []
    for result in results:
        if isinstance(result, LogitsResult):
            if len(host.handles.of_kind(LOGITS)) >= MAX_LOGITS:
                raise HostError(
                    f"{MAX_LOGITS} raw logit rows are held already: release some with "
                    "forward.logits-release"
                )
            out.append(LogitsRef(host.handles.add(LOGITS, logits_array(result.logits))))
        else:
            out.append(result)
    return out


def _row(host: InstanceHost, handle: int) -> np.ndarray:
    return host.handles.get(LOGITS, handle)  # type: ignore[no-any-return]


def logits_top_k(host: InstanceHost, handle: int, k: int) -> tuple[list[int], list[float]]:
    row = _row(host, handle)  # [vocab] float32
    k = max(1, min(int(k), int(row.shape[0])))
    top = np.argpartition(-row, k - 1)[:k]
    top = top[np.argsort(-row[top], kind="stable")]
    return [int(i) for i in top], [float(row[i]) for i in top]


def logits_values(host: InstanceHost, handle: int, tokens: list[int]) -> list[float]:
    row = _row(host, handle)
    bad = next((t for t in tokens if not 0 <= t < row.shape[0]), None)
    if bad is not None:
        raise HostError(f"token id {bad} is outside the vocabulary [0, {row.shape[0]})")
    return [float(v) for v in row[tokens].tolist()]


def logits_release(host: InstanceHost, handle: int) -> None:
    host.handles.pop(LOGITS, handle)


# ---- delegated decode loops ----------------------------------------------------------------------
def check_spec(host: InstanceHost, spec: GenerateSpec) -> None:
    model = host.services.model
    if not spec.tokens:
        raise HostError("nothing to run: a generation starts from at least one queued token")
    if not isinstance(spec.sampler, Greedy | Sample):
        raise HostError("a delegated generation samples with greedy or sample only")
    bad = next((t for t in spec.tokens if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        raise HostError(f"token id {bad} is outside the vocabulary [0, {model.vocab_size})")
    if len(spec.stop_strings) > MAX_STOP_STRINGS or any(
        len(s) > MAX_STOP_STRING for s in spec.stop_strings
    ):
        raise HostError(
            f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_STRING} characters"
        )


def generate(host: InstanceHost, handle: int, spec: GenerateSpec) -> int:
    """Starts a decode loop the host runs on context `handle`; returns its handle."""
    result = generate_many(host, [(handle, spec)])[0]
    if isinstance(result, str):
        raise HostError(result)
    return result


def generate_many(host: InstanceHost, runs: list[tuple[int, GenerateSpec]]) -> list[int | str]:
    """Starts several loops at once (their first passes share a step); per loop its handle or
    an error message."""
    results: list[int | str] = []
    starting: list[tuple[int, int, GenerateSpec]] = []
    for handle, spec in runs:
        try:
            ctx = kv.get(host, handle)
            check_spec(host, spec)
            gen = host.handles.add(GENERATION, ctx)
            starting.append((gen, ctx, spec))
            results.append(gen)
        except GUEST_ERRORS as e:
            results.append(str(e) or type(e).__name__)
    if starting:
        host.control.generate_many(starting)
    return results


def generate_next(host: InstanceHost, gen: int) -> int:
    """A future for the generation's next chunk (or its end)."""
    host.handles.get(GENERATION, gen)
    return futures.add(host, "generated", host.control.generate_next(gen), gen)


def take_generated(host: InstanceHost, handle: int) -> GeneratedChunk:
    entry: Any = host.handles.get(futures.KIND, handle)
    gen = entry.owner_object
    try:
        chunk: GeneratedChunk = futures.take(host, handle, "generated")
    except HostError:
        _forget(host, gen)  # a failed generation is over
        raise
    if chunk.finish is not None:
        _forget(host, gen)
    return chunk


def generate_stop(host: InstanceHost, gen: int) -> None:
    host.handles.get(GENERATION, gen)
    host.control.generate_stop(gen)


def _forget(host: InstanceHost, gen: int) -> None:
    if any(h == gen for h, _ in host.handles.of_kind(GENERATION)):
        host.handles.pop(GENERATION, gen)
