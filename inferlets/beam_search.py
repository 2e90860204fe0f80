"""Beam search: keep the `width` most likely continuations; each beam is a fork sharing pages.

    pie run inferlets/beam_search.py -- 3 12 "The capital of France is"

Each step, every live beam runs its newest token and asks for its `TopK(width)`; of all
(beam, token) candidates the `width` best by summed log-probability go on, each as a fork of
its beam (the beam's pages are shared, only its partial last page is copied). A candidate that
ends in a stop token is finished. At the end, beams rank by log-probability / length ** ALPHA
(the length penalty). The result lists every finished beam, best first.
"""

import asyncio
import json
import math

from pie.sdk import Context, TopK

ALPHA = 1.0


async def top_k(beam: Context, k: int) -> list[tuple[int, float]]:
    tokens, beam.pending = beam.pending, []
    (dist,) = await beam.forward(tokens, [(len(tokens) - 1, TopK(k))])
    return [(t, math.log(p)) for t, p in zip(dist.tokens, dist.probs, strict=True)]


async def main(args: list[str]) -> str:
    width = int(args[0]) if args else 3
    max_tokens = int(args[1]) if len(args) > 1 else 12
    prompt = " ".join(args[2:]) or "The capital of France is"
    root = Context()
    root.fill(prompt)
    stops = root.tokenizer.stop_tokens
    live: list[tuple[float, list[int], Context]] = [(0.0, [], root)]  # logprob, tokens, KV
    done: list[tuple[float, list[int]]] = []
    for _ in range(max_tokens):
        expansions = await asyncio.gather(*(top_k(beam, width) for _, _, beam in live))
        candidates = [
            (logprob + lp, i, [*tokens, t])
            for i, ((logprob, tokens, _), options) in enumerate(zip(live, expansions, strict=True))
            for t, lp in options
        ]
        candidates.sort(key=lambda c: -c[0])  # stable: ties keep beam order, then token rank
        next_live = []
        for logprob, i, tokens in candidates[:width]:
            if tokens[-1] in stops:
                done.append((logprob, tokens))
                continue
            child = live[i][2].fork()  # shares the beam's pages
            child.fill_tokens(tokens[-1:])
            next_live.append((logprob, tokens, child))
        for _, _, beam in live:
            beam.close()
        live = next_live
        if not live:
            break
    done += [(logprob, tokens) for logprob, tokens, _ in live]
    beams = [
        {
            "text": root.tokenizer.decode(tokens),
            "tokens": tokens,
            "logprob": round(logprob, 5),
            "score": round(logprob / len(tokens) ** ALPHA, 5),
        }
        for logprob, tokens in done
    ]
    return json.dumps(sorted(beams, key=lambda b: -b["score"]))
