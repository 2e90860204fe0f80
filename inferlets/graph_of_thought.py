"""Graph of thoughts: branch, merge the branches in one node, refine it, keep the better one.

    pie run inferlets/graph_of_thought.py -- "Suggest a name for a bakery."

The thoughts form a graph, not a tree: the aggregation node has every branch as a parent.

                prompt
            /     |     \\
        idea 1  idea 2  idea 3      forks of the prompt, sampled side by side (one batch a step)
            \\     |     /
            aggregate               a fork of the prompt + the three ideas' texts
                  |
               refine               a fork of the aggregate, asked for a better version

A context is one sequence, so the branches' KV cannot be spliced together; the aggregate forks
the prompt again (its pages are shared) and adds the ideas as new tokens. The aggregate and the
refinement are then scored by the log-odds of " yes" over " no" to a judge question, asked in
a fork of each, and the better one is the answer. `pages_shared` counts the parents' full pages
the forks reuse, `pages_copied` the partial last pages copied on a fork's first write.
"""

import asyncio
import json

from pie.sdk import Chat, Context, Logprobs, Sample

BRANCHES, IDEA_TOKENS, MERGE_TOKENS = 3, 16, 32
JUDGE = "\nIs this a good answer? Answer yes or no:"
pages = {"shared": 0, "copied": 0}


def fork(parent: Context) -> Context:
    shared, copied = parent.fork_pages()
    pages["shared"] += shared
    pages["copied"] += copied
    return parent.fork()


async def idea(branch: Context, seed: int) -> str:
    with branch:
        text = await branch.generate(IDEA_TOKENS, Sample(temperature=0.9, seed=seed), stop=["\n"])
    return text.strip()


async def score(node: Context) -> float:
    with fork(node) as probe:
        probe.fill(JUDGE)
        tokens, probe.pending = probe.pending, []
        yes, no = (probe.tokenizer.encode(word)[0] for word in (" yes", " no"))
        (odds,) = await probe.forward(tokens, [(len(tokens) - 1, Logprobs((yes, no)))])
    return odds[0] - odds[1]


async def main(args: list[str]) -> str:
    task = " ".join(args) or "Suggest a name for a bakery."
    prompt = Context()
    prompt.fill_chat(Chat(system="Think of ideas, then combine the best of them.", user=task))
    ideas = await asyncio.gather(*(idea(fork(prompt), seed) for seed in range(BRANCHES)))
    aggregate = fork(prompt)  # a new node on the prompt's pages; the ideas come in as text
    listed = "".join(f"\n{n}. {text}" for n, text in enumerate(ideas, start=1))
    aggregate.fill(f"Ideas:{listed}\n\nCombined:\n\n")
    merged = (await aggregate.generate(MERGE_TOKENS, stop=["\n\n"])).strip()
    refine = fork(aggregate)
    refine.fill("\n\nImproved:\n\n")
    refined = (await refine.generate(MERGE_TOKENS, stop=["\n\n"])).strip()
    scores = await asyncio.gather(score(aggregate), score(refine))
    for node in (prompt, aggregate, refine):  # held to here, so every fork copied its last page
        node.close()
    return json.dumps(
        {
            "ideas": ideas,
            "aggregate": merged,
            "refined": refined,
            "scores": [round(s, 3) for s in scores],
            "answer": refined if scores[1] > scores[0] else merged,
            "pages_shared": pages["shared"],
            "pages_copied": pages["copied"],
        }
    )
