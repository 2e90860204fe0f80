"""Skeleton of thought: outline the answer as short points, then expand every point at once.

    pie run inferlets/skeleton_of_thought.py -- "How do I make a good cup of tea?"

The skeleton is written in one context, one numbered point per line (the program writes each
number, so the outline has exactly `POINTS` points). Each point is then expanded in a fork of
the whole skeleton: the forks see the question and every point, share their pages, and decode
side by side, so each step of the expansions is one batch `POINTS` wide. Only a fork's partial
last page is copied, on its first write:

      skeleton  [page 0][page 1][page 2|..]      fork i  [page 0][page 1][copy of page 2|..]
                 shared  shared  copied

`pages_shared` counts the skeleton's full pages the forks reuse, `pages_copied` the partial ones.
"""

import asyncio
import json

from pie.sdk import Chat, Context, Sample

POINTS, POINT_TOKENS, EXPAND_TOKENS = 3, 12, 40
SYSTEM = "First outline the answer as short numbered points, then expand each point."
pages = {"shared": 0, "copied": 0}


def fork(parent: Context) -> Context:
    shared, copied = parent.fork_pages()
    pages["shared"] += shared
    pages["copied"] += copied
    return parent.fork()


async def outline(ctx: Context) -> list[str]:
    """Writes the skeleton into `ctx`: a number, then the model's point until the line ends."""
    ctx.fill("Skeleton:")
    points = []
    for number in range(1, POINTS + 1):
        ctx.fill(f"\n{number}.")
        point = await ctx.generate(POINT_TOKENS, Sample(0.7, seed=number), stop=["\n"])
        points.append(point.strip())
        if ctx.finish_reason == "stop-string":
            ctx.truncate(len(ctx) - 1)  # drop the queued token holding the line break
    ctx.fill("\n")
    return points


async def expand(branch: Context, number: int, point: str) -> str:
    branch.fill(f"\nPoint {number} ({point}) in one or two sentences:")
    text = await branch.generate(EXPAND_TOKENS, stop=["\n\n"])
    branch.close()
    return text.strip()


async def main(args: list[str]) -> str:
    question = " ".join(args) or "How do I make a good cup of tea?"
    with Context() as skeleton:
        skeleton.fill_chat(Chat(system=SYSTEM, user=question))
        points = await outline(skeleton)
        branches = [fork(skeleton) for _ in points]
        expansions = await asyncio.gather(
            *(
                expand(b, n, p)
                for n, (b, p) in enumerate(zip(branches, points, strict=True), start=1)
            )
        )
    answer = "\n".join(
        f"{n}. {p}: {e}" for n, (p, e) in enumerate(zip(points, expansions, strict=True), start=1)
    )
    return json.dumps(
        {
            "points": points,
            "expansions": expansions,
            "answer": answer,
            "pages_shared": pages["shared"],
            "pages_copied": pages["copied"],
        }
    )
