"""Host side of the `grammar` interface: compile grammars to handles, constrain contexts.

A grammar is compiled (and checked against the model's tokenizer) where the instance runs, so
compiling a large schema costs a worker's CPU, not the control process's; its handle holds
llguidance's grammar text. `constrain` sends that text to the control plane, which builds the
matcher next to the context it follows (`pie/runtime/plane/grammars.py`). Handles go with the
instance's handle table when it ends; the plane drops its matchers with the instance.
"""

from __future__ import annotations

from dataclasses import dataclass

from pie.runtime.errors import HostError
from pie.runtime.host import kv
from pie.runtime.host import model as model_host
from pie.runtime.host.state import InstanceHost
from pie.runtime.plane.grammars import ConstraintState, compile_grammar, matcher_tokenizer

GRAMMAR = "grammar"
MAX_SOURCE = 2**20  # characters of one schema, pattern or Lark text


@dataclass(frozen=True, slots=True)
class CompiledGrammar:
    kind: str  # json-schema | regex | lark
    text: str  # llguidance's grammar text, as the matcher takes it


def _compile(host: InstanceHost, model: int, kind: str, source: str) -> int:
    model_host.info(host, model)  # checks the model handle
    if len(source) > MAX_SOURCE:
        raise HostError(f"a {kind} grammar of {len(source)} characters; the limit is {MAX_SOURCE}")
    served = host.services.model
    tokenizer = matcher_tokenizer(served.tokenizer, served.vocab_size)
    return host.handles.add(
        GRAMMAR, CompiledGrammar(kind, compile_grammar(kind, source, tokenizer))
    )


def from_json_schema(host: InstanceHost, model: int, schema: str) -> int:
    return _compile(host, model, "json-schema", schema)


def from_regex(host: InstanceHost, model: int, pattern: str) -> int:
    return _compile(host, model, "regex", pattern)


def from_lark(host: InstanceHost, model: int, source: str) -> int:
    return _compile(host, model, "lark", source)


def release(host: InstanceHost, handle: int) -> None:
    host.handles.pop(GRAMMAR, handle)


def constrain(host: InstanceHost, ctx: int, handle: int, start: int) -> None:
    grammar: CompiledGrammar = host.handles.get(GRAMMAR, handle)
    host.control.grammar_constrain(kv.get(host, ctx), grammar.text, start)


def release_constraint(host: InstanceHost, ctx: int) -> bool:
    return host.control.grammar_release_constraint(kv.get(host, ctx))


def constraint_state(host: InstanceHost, ctx: int) -> ConstraintState | None:
    state = host.control.grammar_state(kv.get(host, ctx))
    return None if state is None else ConstraintState(int(state[0]), *map(bool, state[1:]))
