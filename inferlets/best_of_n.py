"""Best-of-n: sample n answers side by side, keep the one the model finds most likely.

    pie run inferlets/best_of_n.py -- 4 "Give a one-line definition of entropy."

The prompt runs once and n forks share its pages. Each fork samples with its own seed, and the
forks decode in the same batches. Each answer is then scored by its mean log-probability: the
fork is truncated back to the prompt and one forward re-reads the answer with a `Logprobs`
output at every position (the log-probability of the token that came next).
"""

import asyncio
import json

from pie.sdk import Chat, Context, Logprobs, Sample

MAX_TOKENS = 48


async def sample_and_score(fork: Context, seed: int) -> tuple[float, list[int]]:
    start, first = fork.kv_length, fork.pending[-1]  # the prompt in the KV, its last token queued
    tokens = await fork.generate_tokens(MAX_TOKENS, Sample(temperature=0.9, seed=seed))
    fork.truncate(start)  # rewind to the prompt and re-read the answer in one forward
    inputs = [first, *tokens[:-1]]
    logprobs = await fork.forward(inputs, [(i, Logprobs((t,))) for i, t in enumerate(tokens)])
    fork.close()
    return sum(lp[0] for lp in logprobs) / len(tokens), tokens


async def main(args: list[str]) -> str:
    n = int(args[0]) if args and args[0].isdigit() else 4
    prompt = " ".join(args[1:]) or "Give a one-line definition of entropy."
    ctx = Context()
    ctx.fill_chat(Chat(user=prompt))
    forks = [ctx.fork() for _ in range(n)]
    scored = await asyncio.gather(*(sample_and_score(f, seed) for seed, f in enumerate(forks)))
    stops = ctx.tokenizer.stop_tokens
    texts = [ctx.tokenizer.decode([t for t in tokens if t not in stops]) for _, tokens in scored]
    best = max(range(n), key=lambda i: scored[i][0])
    return json.dumps(
        {
            "best": best,
            "text": texts[best],
            "scores": [round(score, 4) for score, _ in scored],
            "texts": texts,
        }
    )
