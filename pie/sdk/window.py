"""Generation in bounded memory: each token sees a sink of the first slots (StreamingLLM's
attention sinks) and the last `window` tokens, however long the text runs.

Tokens leaving the window are hidden with `Context.mask`; when the next token would not fit
in the page budget, `Context.truncate` frees every page past the sink and the window is run
again behind it. The context never holds more than `pages` pages.

      slots: [0, sink) the sink | hidden ... | the window: the last `window` tokens
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pie.sdk._wit import PieError
from pie.sdk.context import Context


@dataclass(frozen=True)
class WindowRun:
    tokens: list[int]  # the generated tokens
    most_pages: int  # the most pages the context held at once
    rebuilds: int  # how often the window was run again behind the sink


async def generate_in_window(
    ctx: Context,
    max_tokens: int,
    *,
    pages: int,
    sink: int = 0,
    logit_mask: Sequence[int] | None = None,
) -> WindowRun:
    """Greedy tokens from `ctx`'s queued prompt, within `pages` pages (window: half of them).
    `sink` 0 is plain sliding-window attention."""
    budget = pages * ctx.model.page_size  # KV slots the context may hold
    window = budget // 2
    seq = list(ctx.pending)  # every token: the prompt, then the generated ones
    if len(seq) > budget or sink >= window:
        raise PieError(f"a prompt of {len(seq)} tokens and a sink of {sink} do not fit {budget}")
    await ctx.flush()
    shift, hidden_to = 0, sink  # slot k >= sink holds seq[k + shift]; [sink, hidden_to) hidden
    most_pages = rebuilds = 0
    for _ in range(max_tokens):
        if ctx.kv_length + 1 > budget:  # the next token would not fit: rebuild the window
            ctx.truncate(sink)  # frees every page past the sink
            ctx.fill_tokens(seq[-window:])
            shift, hidden_to = len(seq) - window - sink, sink
            await ctx.flush()
            rebuilds += 1
        end = len(seq) - window - shift  # slots before `end` (past the sink) left the window
        if end > hidden_to:
            ctx.mask(hidden_to, end)
            hidden_to = end
        seq.append(await ctx.next_token(logit_mask=logit_mask))
        most_pages = max(most_pages, ctx.page_count)
    return WindowRun(seq[len(seq) - max_tokens :], most_pages, rebuilds)
