"""Regex-constrained output, sampled on forks that share the prompt and copy its matcher.

    pie run inferlets/regex_output.py -- 'When did Apollo 11 land on the Moon?'
    pie run inferlets/regex_output.py -- --pattern '(yes|no)' --samples 2 'Is water wet?'

The pattern is compiled on the host to a grammar handle and attached to the prompt's context
before it is forked: each fork gets a copy of the matcher (in the state its parent had) along
with the prompt's pages, and samples its answer with its own seed, the host masking every step
with what the pattern still allows. Every answer matches the pattern whole, whatever was drawn.

Arguments: [--pattern REGEX] [--samples N] [--max-tokens N] PROMPT...
Result (JSON): pattern, answers (one text per sample), matches (each matches the pattern whole,
checked with Python's `re`), tokens (per answer, the stop token included).
"""

import asyncio
import json
import re

from pie.sdk import Chat, Context, Sample
from pie.sdk.grammar import Grammar

PATTERN = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"  # an ISO date
SYSTEM = "Answer with the date only, as YYYY-MM-DD."


def options(args: list[str]) -> tuple[str, int, int, str]:
    pattern, samples, max_tokens = PATTERN, 3, 48
    while args and args[0].startswith("--"):
        flag, value = args.pop(0), args.pop(0)
        if flag == "--pattern":
            pattern = value
        elif flag == "--samples":
            samples = int(value)
        elif flag == "--max-tokens":
            max_tokens = int(value)
        else:
            raise ValueError(f"unknown option {flag}")
    return pattern, samples, max_tokens, " ".join(args) or "When did Apollo 11 land on the Moon?"


async def answer(ctx: Context, seed: int, max_tokens: int) -> list[int]:
    return await ctx.generate_tokens(max_tokens, Sample(temperature=0.8, seed=seed))


async def main(args: list[str]) -> str:
    pattern, samples, max_tokens, prompt = options(list(args))
    system = SYSTEM if pattern == PATTERN else f"Answer in the form {pattern}."
    ctx = Context()
    ctx.fill_chat(Chat(system=system, user=prompt))
    with Grammar.regex(pattern) as grammar:
        ctx.constrain(grammar)  # before the forks: each copies the matcher
        forks = [ctx.fork() for _ in range(samples)]
        runs = await asyncio.gather(*(answer(f, i, max_tokens) for i, f in enumerate(forks)))
    stops = ctx.tokenizer.stop_tokens
    answers = [ctx.tokenizer.decode([t for t in tokens if t not in stops]) for tokens in runs]
    result = {
        "pattern": pattern,
        "answers": answers,
        "matches": [re.fullmatch(pattern, a) is not None for a in answers],
        "tokens": [len(tokens) for tokens in runs],
    }
    return json.dumps(result)
