"""Multi-turn chat: each line from the client is a user turn; the answer streams back.

    pie run inferlets/chat.py                          # type lines; Ctrl-D ends the chat
    printf 'Hi!\\nWhat did I just say?\\n' | pie run inferlets/chat.py

The conversation stays in one context: each turn fills only the new part of the rendered chat
(the KV of every earlier turn is reused). The chat ends when the client closes its input (the
end of stdin for `pie run`, `close_input` over the protocol): `messages()` then stops.
"""

from pie.sdk import Chat, Context, Model, messages, send


async def main(args: list[str]) -> str:
    chat = Chat(system=" ".join(args) or "You are a helpful assistant.")
    model = Model.default()
    ctx: Context | None = None
    held = ""  # the conversation text the context holds (its KV plus queued tokens)
    turns = 0
    async for line in messages():
        chat.user(line)
        rendered = model.tokenizer.apply_chat_template(chat.messages, add_generation_prompt=True)
        if ctx is not None and rendered.startswith(held):
            if ctx.finish_reason == "stop-token":
                ctx.pending.clear()  # the template writes its own end of turn
            ctx.fill(rendered[len(held) :])
        else:  # the first turn, or a template that rewrites earlier turns: start over
            if ctx is not None:
                ctx.close()
            ctx = Context(model)
            ctx.fill(rendered)
        answer = await ctx.generate(max_tokens=256, stream=send)
        send("\n")
        chat.assistant(answer)
        held = rendered + answer
        turns += 1
    if ctx is not None:
        ctx.close()
    return f"[the client closed its input; turns: {turns}]"
