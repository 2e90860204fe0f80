"""Self-consistency: sample n reasoning paths side by side, answer by majority vote.

    pie run inferlets/self_consistency.py -- 5 "Tom has 3 apples and buys 4 more. How many?"

The question runs once and n forks share its pages; each samples its own path with its own
seed, and the forks decode in the same batches. The final answer of each path (its last
number, or its last word when it has none) gets one vote; the most voted answer wins, ties to
the answer seen first.
"""

import asyncio
import json
import re
from collections import Counter

from pie.sdk import Chat, Context, Sample

MAX_TOKENS = 64


def final_answer(text: str) -> str:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    words = text.split()
    return numbers[-1] if numbers else (words[-1].strip(".,!?") if words else "")


async def main(args: list[str]) -> str:
    n = int(args[0]) if args and args[0].isdigit() else 5
    question = " ".join(args[1:]) or "Tom has 3 apples and buys 4 more. How many apples now?"
    ctx = Context()
    ctx.fill_chat(Chat(system="Think step by step, then give the answer.", user=question))
    forks = [ctx.fork() for _ in range(n)]
    paths = await asyncio.gather(
        *(f.generate(MAX_TOKENS, Sample(temperature=0.8, seed=i)) for i, f in enumerate(forks))
    )
    answers = [final_answer(path) for path in paths]
    votes = Counter(answers)
    return json.dumps({"answer": votes.most_common(1)[0][0], "votes": votes, "paths": paths})
