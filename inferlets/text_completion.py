"""Chat completion: answers the prompt given as arguments, streaming the text as it comes.

pie run inferlets/text_completion.py -- "Why is the sky blue?"
"""

from pie.sdk import Chat, Context, send


async def main(args: list[str]) -> str:
    prompt = " ".join(args) or "Tell me a short story about a robot."
    ctx = Context()
    ctx.fill_chat(Chat(system="You are a helpful assistant.", user=prompt))
    return await ctx.generate(max_tokens=256, stream=send)
