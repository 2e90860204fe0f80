"""Tree of thoughts: branch, judge each branch, expand the best, answer from the best path.

    pie run inferlets/tree_of_thought.py -- "How can I boil an egg without a pot?"

At each of `DEPTH` levels, `BREADTH` forks of the best path so far each sample one more thought
(one line); they decode side by side, so their steps share batches. A fork of each branch then
asks the model to judge it, and the log-odds of "yes" over "no" scores it. A fork shares every
page of its parent; only a partial last page is copied, on the fork's first write:

      parent  [page 0][page 1][page 2|..]      fork  [page 0][page 1][copy of page 2|..]
               shared  shared  copied

`pages_shared` counts the parents' full pages the forks reuse, `pages_copied` the partial ones.
"""

import asyncio
import json

from pie.sdk import Chat, Context, Logprobs, Sample

BREADTH, DEPTH, THOUGHT_TOKENS = 3, 2, 24
JUDGE = "\nIs this a sensible next step? Answer yes or no:"
pages = {"shared": 0, "copied": 0}


def fork(parent: Context) -> Context:
    shared, copied = parent.fork_pages()
    pages["shared"] += shared
    pages["copied"] += copied
    return parent.fork()


async def think(branch: Context, seed: int) -> str:
    return await branch.generate(THOUGHT_TOKENS, Sample(temperature=0.8, seed=seed), stop=["\n"])


async def judge(branch: Context) -> float:
    with fork(branch) as probe:
        probe.fill(JUDGE)
        tokens, probe.pending = probe.pending, []
        yes, no = (probe.tokenizer.encode(word)[0] for word in (" yes", " no"))
        (odds,) = await probe.forward(tokens, [(len(tokens) - 1, Logprobs((yes, no)))])
    return odds[0] - odds[1]


async def main(args: list[str]) -> str:
    problem = " ".join(args) or "How can I boil an egg without a pot?"
    best = Context()
    best.fill_chat(Chat(system="Solve the problem one short step per line.", user=problem))
    levels = []
    for depth in range(DEPTH):
        branches = [fork(best) for _ in range(BREADTH)]
        seeds = range(depth * BREADTH, (depth + 1) * BREADTH)
        thoughts = await asyncio.gather(
            *(think(b, s) for b, s in zip(branches, seeds, strict=True))
        )
        scores = await asyncio.gather(*(judge(b) for b in branches))
        levels.append([[t, round(s, 3)] for t, s in zip(thoughts, scores, strict=True)])
        pick = max(range(BREADTH), key=lambda i: scores[i])
        for i, branch in enumerate(branches):
            if i != pick:
                branch.close()
        best.close()
        best = branches[pick]
        if best.finish_reason != "stop-string":
            best.fill("\n")  # a thought that ran out of tokens still ends its line
    answer = await best.generate(48, stop=["\n\n"])
    return json.dumps(
        {
            "levels": levels,
            "answer": answer,
            "pages_shared": pages["shared"],
            "pages_copied": pages["copied"],
        }
    )
