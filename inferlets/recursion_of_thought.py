"""Recursion of thought: split a problem into sub-problems, solve each in a fork, return answers.

    pie run inferlets/recursion_of_thought.py -- "How many legs do 3 spiders and 4 ants have?"

A node either answers its problem directly (at `DEPTH`) or writes `SPLIT` sub-problems, one per
line, and solves each recursively in a fork of itself: the child sees its parent's problem and
split (their pages are shared; only a partial last page is copied, on the child's first write).
Sibling sub-problems decode side by side, so the `SPLIT ** DEPTH` leaves share every step's
batch. A child's work stays in the child: only its answer comes back to the parent's context,
as one line, and the child is closed. So a parent's context grows by the answers, never by the
reasoning under them:

      root      [problem][split][answer 1][answer 2][final answer]
                            \\ fork         \\ fork
      child 1   [problem][split][sub-problem 1 ...]   (closed once its answer is back)

`pages_shared` and `pages_copied` count the parents' full pages the children reuse and the
partial ones they copy; `longest_context` is the most slots any one context reached.
"""

import asyncio
import json

from pie.sdk import Chat, Context

DEPTH, SPLIT, LINE_TOKENS, ANSWER_TOKENS = 2, 2, 16, 24
SYSTEM = "Solve problems by splitting them into smaller sub-problems."
stats = {"shared": 0, "copied": 0, "longest": 0}


def fork(parent: Context) -> Context:
    shared, copied = parent.fork_pages()
    stats["shared"] += shared
    stats["copied"] += copied
    return parent.fork()


async def line(ctx: Context, prefix: str, tokens: int) -> str:
    """Writes `prefix`, then the model's text until the line ends (the break is not kept)."""
    ctx.fill(prefix)
    text = await ctx.generate(tokens, stop=["\n"])
    if ctx.finish_reason == "stop-string":
        ctx.truncate(len(ctx) - 1)  # drop the queued token holding the line break
    ctx.fill("\n")
    stats["longest"] = max(stats["longest"], len(ctx))
    return text.strip()


async def solve(node: Context, depth: int) -> dict:
    """Solves the problem last written in `node`; returns the node's part of the tree."""
    if depth == DEPTH:
        return {"answer": await line(node, "Answer:", ANSWER_TOKENS)}
    subproblems = [await line(node, f"Sub-problem {n}:", LINE_TOKENS) for n in range(1, SPLIT + 1)]
    children = [fork(node) for _ in subproblems]
    for n, child in enumerate(children, start=1):
        child.fill(f"Solving sub-problem {n}.\n")
    solved = await asyncio.gather(*(solve(child, depth + 1) for child in children))
    for child in children:
        child.close()
    for n, part in enumerate(solved, start=1):  # only the answers come back to this context
        node.fill(f"Answer to sub-problem {n}: {part['answer']}\n")
    answer = await line(node, "So the answer is:", ANSWER_TOKENS)
    subtree = [{"problem": p, **s} for p, s in zip(subproblems, solved, strict=True)]
    return {"subproblems": subtree, "answer": answer}


async def main(args: list[str]) -> str:
    problem = " ".join(args) or "How many legs do 3 spiders and 4 ants have?"
    with Context() as root:
        root.fill_chat(Chat(system=SYSTEM, user=problem))
        tree = await solve(root, 0)
    return json.dumps(
        {
            **tree,
            "pages_shared": stats["shared"],
            "pages_copied": stats["copied"],
            "longest_context": stats["longest"],
        }
    )
