"""Structured output: grammars compiled on the host, constraining what a context may generate.

    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    with Grammar.json_schema(schema) as g:
        text = await ctx.generate(128, grammar=g)  # parses as JSON and fits the schema

A grammar (JSON Schema, regex or Lark; llguidance on the host) is a handle. `ctx.constrain(g)`
attaches a matcher to the context from its current end on (queued tokens excluded): every token
appended after that must fit, and each sampled token is drawn only from what the grammar allows
next; the mask is applied on the host, where the sampler runs. Forks copy the matcher, `truncate`
rolls it back. `ctx.generate(..., grammar=g)` constrains for that one generation: free text
first ("think"), then a constrained answer in the same context, is two `generate` calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pie.sdk._wit import call
from pie.sdk.model import Model

# After `pie.sdk._wit`, which on the host installs the bindings this import finds.
from wit_world.imports import grammar as _grammar  # isort: skip

if TYPE_CHECKING:
    from pie.sdk.context import Context


class Grammar:
    """A grammar compiled for a model; `release()` it (or use `with`) when done, or it lives
    until the inferlet ends. Compiling raises `PieError` with the matcher's reason: the JSON
    Schema keyword it does not support, or the bad regex or Lark construct."""

    def __init__(self, handle: int, kind: str) -> None:
        self.handle = handle
        self.kind = kind

    @classmethod
    def json_schema(
        cls, schema: Mapping[str, Any] | bool | str, model: Model | None = None
    ) -> Grammar:
        """JSON that validates against `schema` (a dict, or its JSON text), written on one line
        with ", " and ": " between items."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls(_compile(_grammar.from_json_schema, model, text), "json-schema")

    @classmethod
    def regex(cls, pattern: str, model: Model | None = None) -> Grammar:
        """Text that the regular expression matches whole (Rust regex syntax: no look-around,
        no backreferences)."""
        return cls(_compile(_grammar.from_regex, model, pattern), "regex")

    @classmethod
    def lark(cls, source: str, model: Model | None = None) -> Grammar:
        """Text in the language of a Lark grammar (llguidance's dialect: a `start` rule,
        terminals in capitals, `/regex/` terminals, `%ignore`)."""
        return cls(_compile(_grammar.from_lark, model, source), "lark")

    def release(self) -> None:
        if self.handle >= 0:
            call(_grammar.release, self.handle)
            self.handle = -1

    def __enter__(self) -> Grammar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class ConstraintState:
    matched: int  # tokens the matcher has consumed
    accepting: bool  # they form a complete match (a stop token may end the output)
    stopped: bool  # nothing but a stop token can follow


def constrain(ctx: Context, grammar: Grammar) -> None:
    """Every token `ctx` gets after its current end (the queued tokens run unconstrained) must
    fit `grammar`; replaces an earlier constraint."""
    call(_grammar.constrain, ctx.handle, grammar.handle, len(ctx))


def release_constraint(ctx: Context) -> bool:
    """Frees `ctx` of its grammar (later tokens are free again); False if it had none."""
    return bool(call(_grammar.release_constraint, ctx.handle))


def constraint_state(ctx: Context) -> ConstraintState | None:
    """What the matcher on `ctx` has matched so far; None without a constraint."""
    state = call(_grammar.constraint_state, ctx.handle)
    if state is None:
        return None
    return ConstraintState(int(state.matched), bool(state.accepting), bool(state.stopped))


@contextmanager
def constrained(ctx: Context, grammar: Grammar) -> Iterator[None]:
    """`constrain` for the duration of a `with` block."""
    constrain(ctx, grammar)
    try:
        yield
    finally:
        release_constraint(ctx)


def _compile(fn: Any, model: Model | None, source: str) -> int:
    return int(call(fn, (model or Model.default()).handle, source))
