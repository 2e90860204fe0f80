"""A green-list watermark (Kirchenbauer et al., 2023) in the sampler, and the detector that finds it.

    pie run inferlets/watermark.py -- mark 64 40 "Write a short story about the sea."
    pie run inferlets/watermark.py -- detect "Some text to test for the watermark."

A keyed hash of the previous token splits the vocabulary: a fraction `GAMMA` of the tokens are
green after it. Each step asks the host for the `TopK(k)` distribution (the 49k-float logit row
never leaves the host), adds `DELTA` to the green tokens' logits (multiplies their
probabilities by e**DELTA), renormalizes over the k and samples with a seeded RNG in the
program. A fork of the same prompt writes an unmarked text of the same length beside it, with
the same RNG and DELTA = 0; stop tokens are left out of both, so both run to full length.

The detector needs only the text and the key: it re-tokenizes the text, counts the tokens that
are green after their predecessor, and computes z = (green - GAMMA T) / sqrt(T GAMMA (1 - GAMMA))
over the T judged tokens. Unmarked text gives |z| of about 1; marked text, a large z.
"""

import asyncio
import itertools
import json
import math
import random

from pie.sdk import Chat, Context, Model, TopK

KEY, GAMMA, DELTA, SEED = 15485863, 0.25, 2.0, 7
MASK64 = 2**64 - 1


def mix(x: int) -> int:
    """splitmix64's finalizer: every input bit flips about half the output bits."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def green(previous: int, token: int) -> bool:
    """Is `token` on the green list seeded by `previous`? (a GAMMA share of the vocabulary)"""
    return mix(mix(KEY ^ previous) ^ token) % 65536 < GAMMA * 65536


def z_score(tokens: list[int]) -> float:
    pairs = list(itertools.pairwise(tokens))  # the first token has no predecessor
    hits = sum(green(previous, token) for previous, token in pairs)
    n = len(pairs)
    return (hits - GAMMA * n) / math.sqrt(n * GAMMA * (1 - GAMMA)) if n else 0.0


def draw(rng: random.Random, tokens: list[int], weights: list[float]) -> int:
    """One token, with probability proportional to its weight."""
    pick = rng.random() * sum(weights)
    for token, weight in zip(tokens, weights, strict=True):
        pick -= weight
        if pick <= 0:
            return token
    return tokens[-1]  # rounding left a sliver past the last weight


async def write(ctx: Context, n: int, k: int, delta: float) -> list[int]:
    """n tokens, each sampled from the top k after adding `delta` to green logits."""
    rng = random.Random(SEED)
    stops = ctx.tokenizer.stop_tokens
    previous, out = ctx.pending[-1], []
    for _ in range(n):
        tokens, ctx.pending = ctx.pending, []
        (dist,) = await ctx.forward(tokens, [(len(tokens) - 1, TopK(k))])
        options = [(t, p) for t, p in zip(dist.tokens, dist.probs, strict=True) if t not in stops]
        weights = [p * math.exp(delta) if green(previous, t) else p for t, p in options]
        token = draw(rng, [t for t, _ in options], weights)
        ctx.pending = [token]
        previous = token
        out.append(token)
    return out


async def mark(n: int, k: int, prompt: str) -> dict:
    marked = Context()
    marked.fill_chat(Chat(user=prompt))
    plain = marked.fork()  # the same prompt KV, for the unmarked text
    runs = await asyncio.gather(write(marked, n, k, DELTA), write(plain, n, k, 0.0))
    marked.close()
    plain.close()
    texts = [marked.tokenizer.decode(tokens) for tokens in runs]
    scores = [round(z_score(marked.tokenizer.encode(text)), 3) for text in texts]
    return {
        "marked": texts[0],
        "unmarked": texts[1],
        "z_marked": scores[0],
        "z_unmarked": scores[1],
    }


async def main(args: list[str]) -> str:
    if args[:1] == ["detect"]:
        text = " ".join(args[1:])
        tokens = Model.default().tokenizer.encode(text)
        return json.dumps({"tokens": len(tokens), "z": round(z_score(tokens), 3)})
    n = int(args[1]) if len(args) > 1 else 64
    k = int(args[2]) if len(args) > 2 else 40
    prompt = " ".join(args[3:]) or "Write a short story about the sea."
    return json.dumps(await mark(n, k, prompt))
