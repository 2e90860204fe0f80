"""A forward request as the runtime submits it, and its admission into an engine record.

Admission checks what the control layer itself relies on (shapes, indices), then builds the
SequenceForward the engine runs: default positions, the page snapshot, and one attention mask
that folds the context's hidden slots into the causal (or the request's own) mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pie.control.context import KvContext
from pie.control.errors import InvalidRequestError
from pie.engine.request import SamplerSpec, SequenceForward


@dataclass(slots=True)
class ForwardRequest:
    """New tokens appended to `context`, with samplers at chosen indices.

    `positions` default to start .. start+n-1, where start is the context's length at submit.
    `attention_mask` is bool [n, start + n] (True = attend), already decoded from run lengths;
    `logit_mask` is bool [vocab] (True = allowed); `outputs` pairs an index into `tokens` with a
    sampler, and the future's result follows their order.
    """

    context: KvContext
    tokens: list[int]
    positions: list[int] | None = None
    attention_mask: np.ndarray | None = None
    logit_mask: np.ndarray | None = None
    outputs: list[tuple[int, SamplerSpec]] = field(default_factory=list)


def check_request(request: ForwardRequest) -> None:
    """Raise InvalidRequestError for what can be judged before slots are reserved."""
    n = len(request.tokens)
    if n == 0:
        raise InvalidRequestError("a forward needs at least one token")
    if request.positions is not None and len(request.positions) != n:
        raise InvalidRequestError(
            f"{n} tokens but {len(request.positions)} positions; give one position per token"
        )
    for index, _ in request.outputs:
        if not 0 <= index < n:
            raise InvalidRequestError(f"output index {index} is outside the {n} new tokens")
    mask = request.attention_mask
    if mask is not None and (
        not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2
    ):
        raise InvalidRequestError("attention_mask must be a 2-D bool numpy array")


def build_sequence(
    request: ForwardRequest, start: int, pages: list[int], hidden: np.ndarray | None
) -> tuple[SequenceForward, bool]:
    """The whole forward as the engine sees it, and whether it may be split into chunks.

    `hidden` is bool [start] (slots of the context hidden from attention) or None. A request
    mask that lets a token see a later new token cannot be split: that token's K/V would not
    exist yet when an earlier chunk runs.
    """
    n = len(request.tokens)
    positions = list(range(start, start + n)) if request.positions is None else request.positions
    mask = request.attention_mask
    if mask is not None and mask.shape != (n, start + n):
        raise InvalidRequestError(
            f"attention_mask must be [{n}, {start + n}] (new tokens x context slots), "
            f"got {list(mask.shape)}"
        )
    splittable = mask is None or not np.triu(mask[:, start:], k=1).any()
    if hidden is not None:
        # mask: [n, start + n]; hidden slots lie in the context part [0, start)
        mask = causal_mask(n, start) if mask is None else mask.copy()
        mask[:, :start] &= ~hidden
    seq = SequenceForward(
        tokens=list(request.tokens),
        positions=list(positions),
        page_ids=pages,
        context_len=start,
        outputs=list(request.outputs),
        attention_mask=mask,
        logit_mask=request.logit_mask,
    )
    return seq, splittable


def causal_mask(n: int, start: int) -> np.ndarray:
    """Bool [n, start + n]: new token i attends to slots 0 .. start + i."""
    return np.arange(start + n)[None, :] <= (start + np.arange(n))[:, None]
