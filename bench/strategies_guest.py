"""The twins of `python -m bench.strategies`: each strategy done the plain way (args[0] the mode).

tot-fresh PROBLEM: `inferlets/tree_of_thought.py` without forks. Every branch, judge and the
    answer start a fresh context and prefill the prompt and the path so far as text, as a client
    of a prompt-in, text-out server would; the seeds, samplers and stops are the inferlet's.
json-retry SCHEMA N PROMPT...: unconstrained generation with parse-and-retry. The answer must
    parse as JSON and fit the schema; a miss is retried up to N times in a fresh context (the
    first try greedy, then seeded samples, since greedy would only repeat itself).
"""

import asyncio
import json
from collections.abc import Awaitable, Callable

from pie.sdk import Chat, Context, Logprobs, Model, Sample

# tree_of_thought's constants: the twin must do the same work
BREADTH, DEPTH, THOUGHT_TOKENS = 3, 2, 24
JUDGE = "\nIs this a sensible next step? Answer yes or no:"
SYSTEM = "Solve the problem one short step per line."


def fresh(prompt: str) -> Context:
    ctx = Context()
    ctx.fill(prompt)
    return ctx


async def think(prefix: str, seed: int) -> tuple[str, str]:
    with fresh(prefix) as ctx:
        text = await ctx.generate(THOUGHT_TOKENS, Sample(temperature=0.8, seed=seed), stop=["\n"])
        return text, ctx.finish_reason or ""


async def judge(prefix: str) -> float:
    with fresh(prefix + JUDGE) as ctx:
        tokens, ctx.pending = ctx.pending, []
        yes, no = (ctx.tokenizer.encode(word)[0] for word in (" yes", " no"))
        (odds,) = await ctx.forward(tokens, [(len(tokens) - 1, Logprobs((yes, no)))])
    return odds[0] - odds[1]


async def tot_fresh(problem: str) -> str:
    chat = Chat(system=SYSTEM, user=problem)
    path = Model.default().tokenizer.apply_chat_template(chat.messages, True)
    levels = []
    for depth in range(DEPTH):
        seeds = range(depth * BREADTH, (depth + 1) * BREADTH)
        thoughts = await asyncio.gather(*(think(path, s) for s in seeds))
        # a branch that stopped at its line break holds it (in the token that held the break)
        ends = ["\n" if finish == "stop-string" else "" for _, finish in thoughts]
        scores = await asyncio.gather(
            *(judge(path + text + end) for (text, _), end in zip(thoughts, ends, strict=True))
        )
        levels.append([[t, round(s, 3)] for (t, _), s in zip(thoughts, scores, strict=True)])
        text, _ = thoughts[max(range(BREADTH), key=lambda i: scores[i])]
        path += text + "\n"  # the line break the stop string cut, or the one added after it
    with fresh(path) as ctx:
        answer = await ctx.generate(48, stop=["\n\n"])
    return json.dumps({"levels": levels, "answer": answer})


def fits(value: object, schema: dict) -> bool:
    """The JSON Schema keywords json_output's schema uses: type, properties, required,
    additionalProperties, items, maxItems, maxLength, minimum."""
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (
            isinstance(value, dict)
            and all(k in value for k in schema.get("required", []))
            and (schema.get("additionalProperties", True) or set(value) <= set(props))
            and all(fits(v, props[k]) for k, v in value.items() if k in props)
        )
    if kind == "array":
        return (
            isinstance(value, list)
            and len(value) <= schema.get("maxItems", len(value))
            and all(fits(v, schema.get("items", {})) for v in value)
        )
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return type(value) is int and value >= schema.get("minimum", value)
    return True


async def json_retry(schema_text: str, tries: str, *words: str) -> str:
    schema = json.loads(schema_text)
    system = "Answer with one JSON value that fits this JSON schema: " + json.dumps(schema)
    tokens = 0
    for attempt in range(int(tries)):
        with Context() as ctx:
            ctx.fill_chat(Chat(system=system, user=" ".join(words)))
            sampler = None if attempt == 0 else Sample(temperature=0.7, seed=attempt)
            out = await ctx.generate_tokens(192, sampler)
        tokens += len(out)
        text = ctx.tokenizer.decode([t for t in out if t not in ctx.tokenizer.stop_tokens])
        try:
            value = json.loads(text.strip().removeprefix("```json").strip("`\n "))
        except ValueError:
            continue
        if fits(value, schema):
            return json.dumps({"valid": True, "tries": attempt + 1, "tokens": tokens})
    return json.dumps({"valid": False, "tries": int(tries), "tokens": tokens})


async def main(args: list[str]) -> str:
    modes: dict[str, Callable[..., Awaitable[str]]] = {
        "tot-fresh": tot_fresh,
        "json-retry": json_retry,
    }
    return await modes[args[0]](*args[1:])
