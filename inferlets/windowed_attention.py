"""Sliding-window attention: each token sees only the last `window` tokens, in bounded memory.

    pie run inferlets/windowed_attention.py -- 512 8 "Tell me a long story about a lighthouse."

The slot that leaves the window is hidden with `mask` before each step. When the KV would outgrow
the budget (`pages` pages), `truncate(0)` frees every page and the window is run again from slot
0, so the context never holds more than `pages` pages, however long the text.

      slots: [0, hidden_to) hidden | the window: the last `window` tokens
"""

import json

from pie.sdk import Chat, Context, PieError, runs
from pie.sdk import _wit as wit


async def main(args: list[str]) -> str:
    max_tokens = int(args[0]) if args else 512
    pages = int(args[1]) if len(args) > 1 else 8
    prompt = " ".join(args[2:]) or "Tell me a long story about a lighthouse keeper."
    ctx = Context()
    ctx.fill_chat(Chat(user=prompt))
    budget = pages * ctx.model.page_size  # KV slots the context may hold
    window = budget // 2
    seq = list(ctx.pending)  # every token: the prompt, then the generated ones
    if len(seq) > budget:
        raise PieError(f"the prompt is {len(seq)} tokens; the budget holds {budget}")
    stops = ctx.tokenizer.stop_tokens  # banned: the text goes on to max_tokens
    no_stop = runs([t not in stops for t in range(ctx.model.vocab_size)])
    await ctx.flush()
    shift, hidden_to = 0, 0  # KV slot k holds seq[k + shift]; slots [0, hidden_to) are hidden
    most_pages = rebuilds = 0
    for _ in range(max_tokens):
        if ctx.kv_length + 1 > budget:  # the next token would not fit: run the window again
            ctx.truncate(0)  # frees every page
            ctx.fill_tokens(seq[-window:])
            shift, hidden_to = len(seq) - window, 0
            await ctx.flush()
            rebuilds += 1
        end = len(seq) - window - shift  # slots before `end` left the window
        if end > hidden_to:
            ctx.mask(hidden_to, end)
            hidden_to = end
        seq.append(await ctx.next_token(logit_mask=no_stop))
        most_pages = max(most_pages, wit.call(wit.kv.page_count, ctx.handle))
    generated = seq[len(seq) - max_tokens :]
    return json.dumps(
        {
            "text": ctx.tokenizer.decode(generated),
            "tokens": generated,
            "budget_pages": pages,
            "most_pages": most_pages,
            "rebuilds": rebuilds,
        }
    )
