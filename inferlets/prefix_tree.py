"""A tree of prompts, 1 x 2 x 2 x 2: each level forks its parent, so siblings share its pages.

    pie run inferlets/prefix_tree.py -- "Describe a cat."

The root holds the system prompt and the start of the user turn; each level adds one more piece
of the user message to a fork of each node, and the 8 leaves close the turn and answer side by
side. Every node's tokens run once: a leaf's KV is the root's pages, one of two level-1 nodes',
one of four level-2 nodes', then its own. `leaf_pages` sums the pages each leaf holds, what 8
separate prompts would take; the instance holds far fewer (the test runs it under that quota).
"""

import asyncio
import json

from pie.sdk import Context, Model

SYSTEM = "You are a writer. Follow every instruction in the request."
LEVELS = [
    [" Write about the sea.", " Write about the mountains."],
    [" Make it cheerful.", " Make it gloomy."],
    [" Use one sentence.", " Use exactly three words."],
]
MARK = "\x00"


async def main(args: list[str]) -> str:
    topic = " ".join(args) or "Describe a place."
    template = Model.default().tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": MARK}], True
    )
    head, tail = template.split(MARK)  # the rendered turn around the user's text
    root = Context()
    root.fill(head + topic)
    nodes = [(root, "")]
    for pieces in LEVELS:  # each node forks once per piece: its pages are shared, not copied
        children = []
        for node, path in nodes:
            for piece in pieces:
                child = node.fork()
                child.fill(piece)
                children.append((child, path + piece))
        nodes = children
    for node, _ in nodes:
        node.fill(tail)
    answers = await asyncio.gather(*(node.generate(max_tokens=32) for node, _ in nodes))
    leaf_pages = sum(node.page_count for node, _ in nodes)
    return json.dumps(
        {
            "leaves": [
                {"path": path.strip(), "answer": answer}
                for (_, path), answer in zip(nodes, answers, strict=True)
            ],
            "leaf_pages": leaf_pages,
        }
    )
