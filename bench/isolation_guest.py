"""The inferlet of `python -m bench.isolation`: one mode per role (args[0])."""

import json

from pie.sdk import Context, send


async def canary(prompt, n):
    """Greedy tokens from a prompt of token ids, one message per token as it comes."""
    ctx = Context()
    ctx.fill_tokens(json.loads(prompt))
    tokens = await ctx.generate_tokens(
        int(n), stop_tokens=(), on_token=lambda _: send("."), delegate=False
    )
    return json.dumps(tokens)


async def prefill(prompt):
    """A long prompt of token ids, prefilled and dropped."""
    ctx = Context()
    ctx.fill_tokens(json.loads(prompt))
    await ctx.flush()
    return "filled"


def fail(size):
    raise RuntimeError("x" * int(size))


async def main(args):
    mode, *rest = args
    if mode == "fail":
        fail(*rest)
    return await {"canary": canary, "prefill": prefill}[mode](*rest)
