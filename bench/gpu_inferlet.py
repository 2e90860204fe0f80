"""The inferlet side of `bench.gpu`: greedy generation of a fixed length from token ids.

args: [max_tokens, "id,id,..."]. No tokenizer is needed (the benchmark's models have random
weights), and no stop token ends a sequence early: every request makes exactly max_tokens.
"""

import json

from pie.sdk import Context, Greedy


async def main(args: list[str]) -> str:
    ctx = Context()
    ctx.fill_tokens(int(t) for t in args[1].split(","))
    tokens = await ctx.generate_tokens(int(args[0]), Greedy(), stop_tokens=())
    ctx.close()
    return json.dumps(tokens)
