"""Schema-constrained JSON: output that parses and validates every time, also after free
reasoning in the same context.

    pie run inferlets/json_output.py -- 'Describe a cat.'
    pie run inferlets/json_output.py -- --think --schema '{"type": "integer"}' 'Legs of 3 cats?'

The JSON Schema is compiled on the host (llguidance) to a grammar handle and attached to the
context with `constrain`: the host feeds every new token to the context's matcher and masks the
sampler with what the schema allows next, so when the generation ends (the schema complete,
then a stop token) the text is JSON that fits the schema. With `--think` the model first
reasons freely in the same context; the constraint is attached only after that, so the answer
follows the reasoning with nothing run twice. `--free` runs the same prompt with no grammar,
for comparison; `--own-loop` samples with the program's own loop (a forward per token) instead
of the host's delegated one: the grammar applies the same to both, and so do the tokens.

Arguments: [--think] [--free] [--own-loop] [--max-tokens N] [--schema JSON] PROMPT...
Result (JSON): value (the parsed answer, or null), text, parsed (it is JSON), accepting (the
matcher saw a complete match; null with --free), tokens (answer tokens, the stop token
included), finish, thought (the free text before it, or null).
"""

import json

from pie.sdk import Chat, Context
from pie.sdk.grammar import Grammar, constraint_state

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0},
        "colors": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "colors"],
    "additionalProperties": False,
}
THINK_TOKENS = 96


def options(args: list[str]) -> tuple[dict, str]:
    opts: dict = {"think": False, "free": False, "own-loop": False, "max_tokens": 192,
                  "schema": SCHEMA}  # fmt: skip
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--think", "--free", "--own-loop"):
            opts[flag[2:]] = True
        elif flag == "--max-tokens":
            opts["max_tokens"] = int(args.pop(0))
        elif flag == "--schema":
            opts["schema"] = json.loads(args.pop(0))
        else:
            raise ValueError(f"unknown option {flag}")
    return opts, " ".join(args) or "Describe a cat."


async def main(args: list[str]) -> str:
    opts, prompt = options(list(args))
    schema = opts["schema"]
    ctx = Context()
    system = "Answer with one JSON value that fits this JSON schema: " + json.dumps(schema)
    thought = None
    if opts["think"]:
        ctx.fill_chat(Chat(system=system, user=prompt + " Think it through briefly first."))
        thought = await ctx.generate(THINK_TOKENS, stop=["\n\n"])
        if ctx.finish_reason == "stop-token":  # drop the queued end of turn: the answer follows
            ctx.truncate(len(ctx) - 1)
        ctx.fill("\nThe answer as JSON: ")
    else:
        ctx.fill_chat(Chat(system=system, user=prompt))
    stops = ctx.tokenizer.stop_tokens
    accepting, delegate = None, not opts["own-loop"]
    if opts["free"]:
        tokens = await ctx.generate_tokens(opts["max_tokens"], delegate=delegate)
    else:
        with Grammar.json_schema(schema) as grammar:
            ctx.constrain(grammar)
            tokens = await ctx.generate_tokens(opts["max_tokens"], delegate=delegate)
            accepting = constraint_state(ctx).accepting
            ctx.release_constraint()
    text = ctx.tokenizer.decode([t for t in tokens if t not in stops])
    try:
        value, parsed = json.loads(text), True
    except ValueError:
        value, parsed = None, False
    result = {"value": value, "text": text, "parsed": parsed, "accepting": accepting,
              "tokens": len(tokens), "finish": ctx.finish_reason, "thought": thought}  # fmt: skip
    return json.dumps(result)
