"""A tool call that does not stop generation (the paper's asynchronous calls).

    pie run inferlets/async_tools.py -- http://127.0.0.1:9000/weather?city=Paris "Plan a day in Paris."

The program starts an HTTP request to a tool and, while it is in flight, keeps decoding a first
draft on its context: the host runs the request on its own thread, so the model is not idle
waiting for the network. When the tool answers, its result goes into the same context (no
prompt is sent again) and the model writes the answer with it. A tool that fails or times out
is an error the program reads and says so, never a hung instance.
"""

import asyncio
import json

from pie.sdk import Chat, Context, PieError, http

DRAFT_TOKENS = 48  # the most the model writes before it must see the tool's result


async def main(args: list[str]) -> str:
    url = args[0] if args else "http://127.0.0.1:9000/"
    question = " ".join(args[1:]) or "Plan a day in Paris."
    ctx = Context()
    ctx.fill_chat(Chat(system="Think step by step, then answer.", user=question))
    call = asyncio.ensure_future(http.fetch(url, timeout=10))  # in flight from here on
    draft = []
    while not call.done() and len(draft) < DRAFT_TOKENS:
        draft.append(await ctx.next_token())  # decoding while the tool works
    try:
        reply = await call
        observation = f"tool status {reply.status}: {reply.text()[:2000]}"
    except PieError as e:  # the tool failed: the model hears why, the program goes on
        observation = f"tool failed: {e}"
    ctx.fill(f"\n[{observation}]\nAnswer:")
    answer = await ctx.generate(max_tokens=32)
    return json.dumps(
        {
            "tokens_while_waiting": len(draft),
            "observation": observation,
            "draft": ctx.tokenizer.decode(draft),
            "answer": answer,
        }
    )
