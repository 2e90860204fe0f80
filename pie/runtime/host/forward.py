"""Host side of the `forward` interface: submit forward passes, take their outputs, reduce
raw logit rows that stay on the host.

Masks arrive run-length encoded (see docs/api.md) and are decoded here with numpy into the bool
arrays the control layer takes. `execute` returns at once with a future; the batch scheduler
runs the pass with other instances' passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pie.engine.request import LogitsResult, SampleResult, SamplerSpec
from pie.runtime.errors import GUEST_ERRORS, HostError
from pie.runtime.host import futures, kv
from pie.runtime.host.state import InstanceHost

LOGITS = "logits"
MAX_LOGITS = 64  # raw logit rows one instance may hold at once (each is vocab floats)


@dataclass(slots=True)
class ForwardCall:
    """One `forward-args`, in host types."""

    tokens: list[int]
    positions: list[int] | None
    attention_mask: list[list[int]] | None  # per new token, run lengths hidden/visible/...
    logit_mask: list[int] | None  # run lengths banned/allowed/... over the vocabulary
    outputs: list[tuple[int, SamplerSpec]]


@dataclass(frozen=True, slots=True)
class LogitsRef:
    """A `RawLogits` output: the handle of a row kept on the host."""

    handle: int


def decode_runs(runs: list[int], total: int, what: str) -> np.ndarray:
    """Run lengths alternating False/True (starting with False) → bool array [total]."""
    counts = np.asarray(runs, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any() or int(counts.sum()) != total:
        raise HostError(
            f"{what}: run lengths must be non-negative and sum to {total}, got sum "
            f"{int(counts.sum()) if counts.size else 0}"
        )
    values = (np.arange(len(counts)) % 2).astype(bool)
    return np.repeat(values, counts)


def request(host: InstanceHost, handle: int, call: ForwardCall) -> Any:
    """The control layer's ForwardRequest for `call` on context `handle`, checked."""
    from pie.control.forward import ForwardRequest

    ctx = kv.get(host, handle)
    engine = host.services.engine
    n = len(call.tokens)
    if not 1 <= n <= engine.max_position:
        raise HostError(f"a forward takes 1 to {engine.max_position} tokens, got {n}")
    if call.positions is not None:
        if len(call.positions) != n:
            raise HostError(f"{n} tokens but {len(call.positions)} positions")
        if max(call.positions) >= engine.max_position:
            raise HostError(
                f"position {max(call.positions)} is past the model's context "
                f"({engine.max_position} positions)"
            )
    if len(call.outputs) > n * 4:
        raise HostError(f"{len(call.outputs)} outputs for {n} tokens; at most {n * 4}")
    total = int(ctx.length) + n
    attention = None
    if call.attention_mask is not None:
        if len(call.attention_mask) != n:
            raise HostError(f"attention mask has {len(call.attention_mask)} rows for {n} tokens")
        attention = np.stack(
            [
                decode_runs(r, total, f"attention mask row {i}")
                for i, r in enumerate(call.attention_mask)
            ]
        )  # [n, context + n]
    logit_mask = None
    if call.logit_mask is not None:
        logit_mask = decode_runs(call.logit_mask, int(engine.vocab_size), "logit mask")  # [vocab]
        if not logit_mask.any():  # no token could be sampled: refuse before it reaches a batch
            raise HostError("the logit mask bans every token; allow at least one")
    return ForwardRequest(
        context=ctx,
        tokens=list(call.tokens),
        positions=None if call.positions is None else list(call.positions),
        attention_mask=attention,
        logit_mask=logit_mask,
        outputs=list(call.outputs),
    )


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
    requests: list[Any] = []
    # Each pass needs a free handle, checked before it is submitted: a forward submitted
    # without one could never be taken.
    room = host.handles.limit - len(host.handles)
    for handle, call in passes:
        try:
            if len(requests) >= room:
                raise HostError(
                    f"open-handle limit reached ({host.handles.limit}): take or discard futures"
                )
            requests.append(request(host, handle, call))
            results.append(len(requests) - 1)
        except GUEST_ERRORS as e:
            results.append(str(e) or type(e).__name__)
    submitted = host.services.scheduler.submit_many(requests)
    for i, result in enumerate(results):
        if isinstance(result, int):
            future = submitted[result]
            refused = future.exception() if future.done() else None
            if refused is not None:  # rejected at admission: say so now, not at take time
                results[i] = str(refused) or type(refused).__name__
            else:
                results[i] = futures.add(host, "forward", future, requests[result].context)
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
            out.append(LogitsRef(host.handles.add(LOGITS, result.logits)))
        else:
            out.append(result)
    return out


def _row(host: InstanceHost, handle: int) -> Any:
    return host.handles.get(LOGITS, handle)


def logits_top_k(host: InstanceHost, handle: int, k: int) -> tuple[list[int], list[float]]:
    row = _row(host, handle)  # [vocab] float32
    k = max(1, min(int(k), int(row.shape[0])))
    values, ids = row.topk(k)
    return [int(i) for i in ids.tolist()], [float(v) for v in values.tolist()]


def logits_values(host: InstanceHost, handle: int, tokens: list[int]) -> list[float]:
    row = _row(host, handle)
    bad = next((t for t in tokens if not 0 <= t < row.shape[0]), None)
    if bad is not None:
        raise HostError(f"token id {bad} is outside the vocabulary [0, {row.shape[0]})")
    return [float(v) for v in row[tokens].tolist()]


def logits_release(host: InstanceHost, handle: int) -> None:
    host.handles.pop(LOGITS, handle)
