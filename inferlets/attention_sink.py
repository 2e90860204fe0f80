"""Attention sinks (StreamingLLM): generate far past what a page budget holds, in bounded memory.

    pie run inferlets/attention_sink.py -- 512 8 "Tell me a long story about a lighthouse."

Each token sees the first `SINK` slots (the sink, never freed) and the last `window` tokens.
Tokens leaving the window are hidden with `mask`; when the KV would outgrow the budget (`pages`
pages), `truncate` frees every page past the sink and the window is run again behind it. The
context never holds more than `pages` pages, however long the text.

      slots: [0, SINK) sink | hidden ... | the window: the last `window` tokens
"""

import json

from pie.sdk import Chat, Context, PieError, runs
from pie.sdk import _wit as wit

SINK = 4


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
    shift, hidden_to = 0, SINK  # KV slot k >= SINK holds seq[k + shift]; [SINK, hidden_to) hidden
    most_pages = rebuilds = 0
    for _ in range(max_tokens):
        if ctx.kv_length + 1 > budget:  # the next token would not fit: rebuild the window
            ctx.truncate(SINK)  # frees every page past the sink
            ctx.fill_tokens(seq[-window:])
            shift, hidden_to = len(seq) - window - SINK, SINK
            await ctx.flush()
            rebuilds += 1
        end = len(seq) - window - shift  # slots before `end` (past the sink) left the window
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
