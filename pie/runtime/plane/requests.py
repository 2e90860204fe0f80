"""A `ForwardCall` (run-length masks, as the program sent it) → the control layer's
`ForwardRequest` (bool arrays), checked against the context it appends to."""

from __future__ import annotations

import numpy as np

from pie.control.context import KvContext
from pie.control.forward import ForwardRequest
from pie.runtime.calls import ForwardCall
from pie.runtime.errors import HostError


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


def forward_request(ctx: KvContext, start: int, call: ForwardCall, vocab: int) -> ForwardRequest:
    """The request for `call` on `ctx`, whose new tokens will fill slots from `start`."""
    n = len(call.tokens)
    attention = None
    if call.attention_mask is not None:
        if len(call.attention_mask) != n:
            raise HostError(f"attention mask has {len(call.attention_mask)} rows for {n} tokens")
        total = start + n
        attention = np.stack(
            [
                decode_runs(r, total, f"attention mask row {i}")
                for i, r in enumerate(call.attention_mask)
            ]
        )  # [n, start + n]
    logit_mask = None
    if call.logit_mask is not None:
        logit_mask = decode_runs(call.logit_mask, vocab, "logit mask")  # [vocab]
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
