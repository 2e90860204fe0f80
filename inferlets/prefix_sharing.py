"""Prefix sharing across inferlets: one inferlet exports a prompt's KV, others import it.

    pie run inferlets/prefix_sharing.py -- "What is a KV cache?" "Why batch requests?"

The parent runs the shared system prompt once and exports its pages under a name; it then
launches one child inferlet per question. Each child imports the pages (no recomputation),
adds its question, and answers. The parent withdraws the export when the children are done.
"""

import asyncio

from pie.sdk import Context, Model, instance_id, launch

SYSTEM = (
    "You are a patient teacher of computer systems. Answer in two or three sentences, "
    "with one concrete example."
)


def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return Model.default().tokenizer.apply_chat_template(messages, add_generation_prompt)


async def answer(export_name: str, question: str) -> str:
    system = [{"role": "system", "content": SYSTEM}]
    prefix = render(system, add_generation_prompt=False)
    full = render([*system, {"role": "user", "content": question}], add_generation_prompt=True)
    ctx = Context.import_(export_name)
    ctx.fill(full[len(prefix) :])  # only the question's tokens run; the prefix is shared
    return await ctx.generate(max_tokens=96)


async def main(args: list[str]) -> str:
    if args[:1] == ["--answer"]:
        return await answer(args[1], args[2])
    questions = args or ["What is a KV cache?", "Why do servers batch requests?"]
    name = f"prefix-sharing/{instance_id()}"
    shared = Context()
    shared.fill(render([{"role": "system", "content": SYSTEM}], add_generation_prompt=False))
    shared.export(name)
    try:
        children = [launch(["--answer", name, q]) for q in questions]
        answers = await asyncio.gather(*(child.result() for child in children))
    finally:
        Context.unexport(name)
    return "\n\n".join(f"Q: {q}\nA: {a.strip()}" for q, a in zip(questions, answers, strict=True))
