"""Lark-constrained output: an arithmetic expression, retried by rewinding the context.

    pie run inferlets/grammar_output.py -- 24 'Use the numbers 4, 5 and 6.'

A Lark grammar of arithmetic expressions (numbers, + - * /, parentheses) is compiled on the
host and constrains the answer: every draw is masked to what can still extend a well-formed
expression, so the answer always parses. The program evaluates it; if it misses the target it
truncates the context back to the start of the answer, which rolls the matcher back to its
start too, and samples again with another seed. The prompt is never run again.

Arguments: TARGET [PROMPT...]
Result (JSON): target, tries (one per attempt: expression, value, tokens), expression and value
of the last try, hit (the last value equals the target).
"""

import ast
import json

from pie.sdk import Chat, Context, Sample
from pie.sdk.grammar import Grammar

ARITHMETIC = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,4}/
%ignore " "
"""
TRIES, MAX_TOKENS = 3, 40
OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
       ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}  # fmt: skip


def evaluate(node: ast.AST) -> float:
    """The value of an expression the grammar admits (numbers, + - * /, parentheses)."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        return OPS[type(node.op)](evaluate(node.left), evaluate(node.right))
    raise ValueError(f"not arithmetic: {ast.dump(node)}")


def value_of(expression: str) -> float | None:
    try:
        return evaluate(ast.parse(expression, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


async def main(args: list[str]) -> str:
    target = int(args[0]) if args else 24
    task = " ".join(args[1:]) or "Use the numbers 4, 5 and 6."
    ctx = Context()
    ctx.fill_chat(
        Chat(
            system="Reply with one arithmetic expression only, such as (2+3)*4.",
            user=f"Write an expression that equals {target}. {task}",
        )
    )
    await ctx.flush()  # the prompt in the KV but its last token, which samples the answer
    start, last = ctx.kv_length, ctx.pending[-1]
    stops = ctx.tokenizer.stop_tokens
    tries = []
    with Grammar.lark(ARITHMETIC) as grammar:
        ctx.constrain(grammar)  # from the answer's first token on
        for seed in range(TRIES):
            tokens = await ctx.generate_tokens(MAX_TOKENS, Sample(temperature=0.7, seed=seed))
            expression = ctx.tokenizer.decode([t for t in tokens if t not in stops]).strip()
            value = value_of(expression)
            tries.append({"expression": expression, "value": value, "tokens": len(tokens)})
            if value == target:
                break
            ctx.truncate(start)  # the answer's slots go, and the matcher rolls back with them
            ctx.pending = [last]
    return json.dumps(
        {"target": target, "tries": tries, "expression": tries[-1]["expression"],
         "value": tries[-1]["value"], "hit": tries[-1]["value"] == target}
    )  # fmt: skip
