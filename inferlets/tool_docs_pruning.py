"""Tool documentation dropped once the tools are chosen (the paper's tool-docs case study).

    pie run --mcp desk=http://127.0.0.1:9000/mcp inferlets/tool_docs_pruning.py -- \\
        desk free "Plan a day in Lima." '{"weather_forecast": {"city": "Lima"}}'

The agent's prompt carries the full documentation of every tool its MCP server offers (a few
thousand tokens). The model reads it once, to choose the tools the task needs (its choice is
held to the tools' names); then the documentation is dropped, and the agent goes on with only
the chosen tools' one-line signatures: it calls them (all at once, as MCP futures) and answers.

    [system + task] [tool docs ..... "Tools:" choice]        before the choice
    [system + task] [signatures, results, answer]            `free`: the docs' pages freed
    [system + task] [hidden ......... choice] [signatures..] `mask`: hidden, pages still held

`free` truncates the context back to the task (`Context.truncate` gives every page past it back
to the pool), `mask` hides the docs from every later token (`Context.mask`: what a layout can do
when more text follows them), `keep` is the baseline. It reports pages held and the time per
decode step with the docs in view (the choice) and after (the answer).
"""

import asyncio
import json
import time

from pie.sdk import Context, Model, PieError, allowed_tokens, mcp

SYSTEM = "You are a travel agent. You plan with tools, then answer the traveller briefly."


def chat(*turns: tuple[str, str], reply: bool = False) -> str:
    """(role, content) turns in the model's template (`reply`: the assistant's turn opened).
    Each piece starts with a system turn: no template adds its default system prompt."""
    messages = [{"role": role, "content": content} for role, content in turns]
    return Model.default().tokenizer.apply_chat_template(messages, reply)


def docs_page(tool: mcp.Tool) -> str:
    schema = json.dumps(tool.input_schema, indent=1)
    return f"## {tool.name}\n{tool.description.strip()}\nArguments (JSON schema):\n{schema}\n"


async def choose(ctx: Context, names: list[str], picks: int) -> tuple[list[str], list[float]]:
    """Greedy names of `picks` tools, each step held to the tokens that continue one of them."""
    spelled = {name: ctx.tokenizer.encode(" " + name) for name in names}
    chosen: list[str] = []
    steps: list[float] = []
    while len(chosen) < picks:
        prefix: list[int] = []
        while True:
            left = [t for n, t in spelled.items() if n not in chosen and t[: len(prefix)] == prefix]
            done = [n for n in names if n not in chosen and spelled[n] == prefix]
            if done:
                chosen.append(done[0])
                break
            began = time.monotonic()
            mask = allowed_tokens({t[len(prefix)] for t in left}, ctx.model.vocab_size)
            prefix.append(await ctx.next_token(logit_mask=mask))
            steps.append(time.monotonic() - began)
        if len(chosen) < picks:
            ctx.fill(",")
    return chosen, steps


async def main(args: list[str]) -> str:
    server = args[0] if args else "desk"
    mode = args[1] if len(args) > 1 else "free"
    task = args[2] if len(args) > 2 else "Plan a day in Lima: weather, and prices in soles."
    calls = json.loads(args[3]) if len(args) > 3 else {}  # tool -> arguments, where chosen
    answer_tokens = int(args[4]) if len(args) > 4 else 32
    picks = int(args[5]) if len(args) > 5 else 2
    if mode not in ("free", "mask", "keep"):
        raise PieError(f"mode is free, mask or keep, not {mode!r}")
    tools = {t.name: t for t in await mcp.tools(server)}
    ctx = Context()
    ctx.fill(chat(("system", SYSTEM), ("user", task)))
    await ctx.flush()
    task_end = len(ctx)  # slots [0, task_end): the system prompt and the task, kept
    docs = "Tool documentation:\n\n" + "\n".join(docs_page(t) for t in tools.values())
    ctx.fill(chat(("system", docs), reply=True) + "Tools needed:")
    await ctx.flush()
    docs_end = len(ctx) - 1  # the docs' slots: [task_end, docs_end)
    chosen, choice_steps = await choose(ctx, list(tools), picks)
    pages_with_docs = ctx.page_count

    if mode == "free":
        ctx.truncate(task_end)  # every page past the task goes back to the pool
    elif mode == "mask":
        ctx.mask(task_end, docs_end)
    signatures = "\n".join(tools[name].signature() for name in chosen)
    wanted = [name for name in chosen if name in calls]
    results = await asyncio.gather(
        *(mcp.call_tool(server, name, calls[name]) for name in wanted), return_exceptions=True
    )  # in flight together
    seen = [
        f"{name} -> {r.text if isinstance(r, mcp.ToolResult) else f'error: {r}'}"
        for name, r in zip(wanted, results, strict=True)
    ]
    notes = f"Tools chosen:\n{signatures}\nResults:\n" + "\n".join(seen or ["(none called)"])
    ctx.fill(chat(("system", notes), reply=True))
    await ctx.flush()
    pages_after = ctx.page_count
    answer: list[int] = []
    answer_steps: list[float] = []
    for _ in range(answer_tokens):
        began = time.monotonic()
        token = await ctx.next_token()
        answer_steps.append(time.monotonic() - began)
        if token in ctx.tokenizer.stop_tokens:
            break
        answer.append(token)
    return json.dumps(
        {
            "mode": mode,
            "chosen": chosen,
            "results": seen,
            "notes": notes,  # what the agent goes on with, in place of the docs
            "answer": ctx.tokenizer.decode(answer),
            "task_tokens": task_end,
            "docs_tokens": docs_end - task_end,
            "pages_with_docs": pages_with_docs,
            "pages_after": pages_after,
            "pages_end": ctx.page_count,
            "step_ms_with_docs": round(1000 * sum(choice_steps) / max(len(choice_steps), 1), 2),
            "step_ms_after": round(1000 * sum(answer_steps) / max(len(answer_steps), 1), 2),
        }
    )
