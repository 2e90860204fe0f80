"""Parallel generation: N continuations of one prompt that share the prompt's KV pages.

    pie run inferlets/parallel_generation.py -- 3 "Write a haiku about the sea."

The prompt is run once; each fork shares its pages copy-on-write and samples on its own. The
forks generate side by side (plain asyncio), so their decode steps batch together.
"""

import asyncio

from pie.sdk import Chat, Context, Sample


async def main(args: list[str]) -> str:
    n = int(args[0]) if args and args[0].isdigit() else 3
    prompt = " ".join(args[1:]) or "Write a haiku about the sea."
    ctx = Context()
    ctx.fill_chat(Chat(user=prompt))
    forks = [ctx.fork() for _ in range(n)]
    samplers = [Sample(temperature=0.8, top_p=0.95, seed=i) for i in range(n)]
    texts = await asyncio.gather(
        *(fork.generate(max_tokens=64, sampler=s) for fork, s in zip(forks, samplers, strict=True))
    )
    return "\n\n".join(f"[{i}] {text.strip()}" for i, text in enumerate(texts))
