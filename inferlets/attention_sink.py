"""Attention sinks (StreamingLLM): generate far past what a page budget holds, in bounded memory.

    pie run inferlets/attention_sink.py -- 512 8 "Tell me a long story about a lighthouse."

Each token sees the first `SINK` slots (the sink, never freed) and the last tokens of a window
of half the budget (`pie.sdk.window`: `mask` hides what leaves the window, `truncate` frees every
page past the sink when the next token would not fit, and the window runs again behind it). The
context never holds more than `pages` pages, however long the text.
"""

import json

from pie.sdk import Chat, Context, runs
from pie.sdk.window import generate_in_window

SINK = 4


async def main(args: list[str]) -> str:
    max_tokens = int(args[0]) if args else 512
    pages = int(args[1]) if len(args) > 1 else 8
    prompt = " ".join(args[2:]) or "Tell me a long story about a lighthouse keeper."
    ctx = Context()
    ctx.fill_chat(Chat(user=prompt))
    stops = ctx.tokenizer.stop_tokens  # banned: the text goes on to max_tokens
    no_stop = runs([t not in stops for t in range(ctx.model.vocab_size)])
    run = await generate_in_window(ctx, max_tokens, pages=pages, sink=SINK, logit_mask=no_stop)
    return json.dumps(
        {
            "text": ctx.tokenizer.decode(run.tokens),
            "tokens": run.tokens,
            "budget_pages": pages,
            "most_pages": run.most_pages,
            "rebuilds": run.rebuilds,
        }
    )
