"""Host grammars (pie/runtime/plane/grammars.py, host/grammar.py): masks, fork, rollback, errors.

The matcher follows a context's slots; these tests drive it as the control plane does (a
`ForwardRequest` per forward) on the real SmolLM2 tokenizer (llguidance needs a real vocabulary;
no model weights are loaded), and check the host functions' handle checks with a stub port.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from typing import Any

import numpy as np
import pytest

from pie.control.context import KvContext
from pie.control.forward import ForwardRequest
from pie.engine.request import Greedy
from pie.runtime.errors import HostError
from pie.runtime.host import grammar as host_grammar
from pie.runtime.host import model as host_model
from pie.runtime.host.state import HostModel, HostServices, InstanceHost
from pie.runtime.limits import InstanceLimits
from pie.runtime.plane.grammars import (
    Constraints,
    ConstraintState,
    compile_grammar,
    matcher_tokenizer,
)

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ANSWER = '{"name": "Bo", "age": 10}'


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from pie.engine.loader import default_model_path
    from pie.engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture
def constraints(tokenizer: Any) -> Constraints:
    return Constraints(tokenizer, tokenizer.vocab_size)


def _grammar(constraints: Constraints, kind: str = "json-schema", source: str = "") -> str:
    return compile_grammar(kind, source or json.dumps(SCHEMA), constraints.tokenizer())


def _forward(ctx: KvContext, tokens: list[int], sample: bool = True, **kw: Any) -> ForwardRequest:
    outputs = [(len(tokens) - 1, Greedy())] if sample else []
    return ForwardRequest(context=ctx, tokens=tokens, outputs=outputs, **kw)


def _run(constraints: Constraints, ctx: KvContext, tokens: list[int]) -> ForwardRequest:
    """One forward as the plane submits it, admitted: the context takes its slots."""
    request = _forward(ctx, tokens)
    constraints.apply(request)
    ctx.length += len(tokens)
    return request


def _allowed(request: ForwardRequest, tokenizer: Any) -> set[str]:
    assert request.logit_mask is not None
    return {tokenizer.decode([int(t)]) for t in np.flatnonzero(request.logit_mask)}


# ---- masks ----------------------------------------------------------------------------------------
def test_the_mask_allows_what_the_schema_allows_next(
    constraints: Constraints, tokenizer: Any
) -> None:
    ctx = KvContext(1, owner=1, length=5)
    prompt = tokenizer.encode("Hi!")
    constraints.attach(ctx, _grammar(constraints), start=5 + len(prompt))
    first = _run(constraints, ctx, prompt)  # the prompt is not matched; its next token is
    allowed = _allowed(first, tokenizer)
    assert '{"' in allowed and all(text.startswith("{") for text in allowed)
    assert constraints.state(ctx) == ConstraintState(0, False, False)
    answer = tokenizer.encode(ANSWER)
    for token in answer[:-1]:
        step = _run(constraints, ctx, [token])
    assert _allowed(step, tokenizer) >= {"}"} and "," not in _allowed(step, tokenizer)
    last = _run(constraints, ctx, answer[-1:])
    assert set(np.flatnonzero(last.logit_mask)) == set(tokenizer.stop_token_ids)  # only the end
    assert constraints.state(ctx) == ConstraintState(len(answer), True, True)


def test_the_grammar_mask_is_anded_with_the_forwards_own(
    constraints: Constraints, tokenizer: Any
) -> None:
    grammar = _grammar(constraints, "regex", "(yes|no)")
    ctx, other = KvContext(1, owner=1), KvContext(2, owner=1)
    for c in (ctx, other):
        constraints.attach(c, grammar, start=1)  # the prompt's token at slot 0 is free
    own = np.ones(tokenizer.vocab_size, dtype=np.bool_)
    own[tokenizer.encode("yes")] = False
    request = _forward(ctx, [0], logit_mask=own)
    constraints.apply(request)
    assert "yes" not in _allowed(request, tokenizer) and "no" in _allowed(request, tokenizer)
    only_maybe = np.zeros(tokenizer.vocab_size, dtype=np.bool_)
    only_maybe[tokenizer.encode("maybe")[0]] = True
    with pytest.raises(HostError, match="bans every token the grammar allows"):
        constraints.apply(_forward(other, [0], logit_mask=only_maybe))
    assert constraints.state(other) == ConstraintState(0, False, False)


def test_a_rejected_token_is_an_error_with_nothing_consumed(
    constraints: Constraints, tokenizer: Any
) -> None:
    ctx = KvContext(1, owner=1)
    constraints.attach(ctx, _grammar(constraints), start=0)
    _run(constraints, ctx, tokenizer.encode('{"name"'))
    before = constraints.state(ctx)
    with pytest.raises(
        HostError, match=r"does not fit the context's grammar.*nothing was appended"
    ):
        constraints.apply(_forward(ctx, tokenizer.encode(': "Bo", "size"')))
    assert constraints.state(ctx) == before
    request = _run(constraints, ctx, tokenizer.encode(': "Bo", "age": 1'))
    assert "0" in _allowed(request, tokenizer)  # it goes on from where it was


def test_outputs_before_the_last_token_are_refused(constraints: Constraints) -> None:
    ctx = KvContext(1, owner=1)
    constraints.attach(ctx, _grammar(constraints), start=0)
    with pytest.raises(HostError, match="samples only at its last token"):
        constraints.apply(ForwardRequest(ctx, [0, 1], outputs=[(0, Greedy()), (1, Greedy())]))


def test_tokens_before_the_start_are_free(constraints: Constraints, tokenizer: Any) -> None:
    prompt = tokenizer.encode("not JSON at all")
    ctx = KvContext(1, owner=1, length=3)
    constraints.attach(ctx, _grammar(constraints), start=3 + len(prompt))
    _run(constraints, ctx, prompt + tokenizer.encode("{"))
    assert constraints.state(ctx) == ConstraintState(1, False, False)
    with pytest.raises(HostError, match="at or after the context's length"):
        constraints.attach(ctx, _grammar(constraints), start=ctx.length - 1)


# ---- fork, truncate, failed forwards ---------------------------------------------------------------
def test_a_fork_copies_the_matcher_and_they_go_apart(
    constraints: Constraints, tokenizer: Any
) -> None:
    parent = KvContext(1, owner=1)
    constraints.attach(parent, _grammar(constraints, "regex", "(yes|no)[.!]"), start=0)
    _run(constraints, parent, tokenizer.encode("yes"))
    child = KvContext(2, owner=1, length=parent.length)
    constraints.fork(parent, child)
    assert constraints.state(child) == constraints.state(parent)
    _run(constraints, child, tokenizer.encode("!"))
    assert constraints.state(child) == ConstraintState(2, True, True)
    assert constraints.state(parent) == ConstraintState(
        1, False, False
    )  # untouched by the child's token
    assert _allowed(_run(constraints, parent, tokenizer.encode(".")), tokenizer) == {
        tokenizer.decode([t]) for t in tokenizer.stop_token_ids
    }


def test_truncate_rolls_the_matcher_back_even_past_its_end(
    constraints: Constraints, tokenizer: Any
) -> None:
    ctx = KvContext(1, owner=1, length=2)
    constraints.attach(ctx, _grammar(constraints), start=2)
    answer = tokenizer.encode(ANSWER)
    stop = min(tokenizer.stop_token_ids)
    _run(constraints, ctx, [*answer, stop])  # complete, then a stop token: llguidance's end
    assert constraints.state(ctx) == ConstraintState(len(answer) + 1, True, True)
    for keep in (len(answer), 4, 0):
        constraints.truncate(ctx, 2 + keep)
        ctx.length = 2 + keep
        assert constraints.state(ctx) == ConstraintState(
            keep, keep == len(answer), keep == len(answer)
        )
    again = _run(constraints, ctx, answer[:4])  # they fit again, as from a fresh matcher
    new = KvContext(2, owner=1)
    constraints.attach(new, _grammar(constraints), start=0)
    assert np.array_equal(again.logit_mask, _run(constraints, new, answer[:4]).logit_mask)
    constraints.truncate(ctx, 0)  # below the start: the matcher is back at its beginning
    assert constraints.state(ctx) == ConstraintState(0, False, False)


def test_a_forward_refused_before_it_took_its_slots_leaves_the_matcher(
    constraints: Constraints, tokenizer: Any
) -> None:
    ctx = KvContext(1, owner=1)
    constraints.attach(ctx, _grammar(constraints), start=0)
    refused: cf.Future[Any] = cf.Future()
    constraints.watch(constraints.apply(_forward(ctx, tokenizer.encode('{"name'))), refused)
    refused.set_exception(HostError("KV quota exceeded"))  # the context never took the slots
    assert constraints.state(ctx) == ConstraintState(0, False, False)
    # Two passes of one call, both refused: settled newest first (as the plane does), both undo.
    first, second = cf.Future(), cf.Future()  # type: ignore[var-annotated]
    one = constraints.apply(_forward(ctx, tokenizer.encode('{"')))
    two = constraints.apply(_forward(ctx, tokenizer.encode("name")))
    for future in (first, second):
        future.set_exception(HostError("KV quota exceeded"))
    constraints.watch(two, second)
    constraints.watch(one, first)
    assert constraints.state(ctx) == ConstraintState(0, False, False)
    # One that failed in the engine keeps its slots (as the context does): truncate rolls back.
    ran: cf.Future[Any] = cf.Future()
    constraints.watch(constraints.apply(_forward(ctx, tokenizer.encode('{"name'))), ran)
    ctx.length = 2
    ran.set_exception(HostError("the engine failed"))
    assert constraints.state(ctx) == ConstraintState(2, False, False)


def test_closing_and_ending_drop_the_matchers(constraints: Constraints) -> None:
    a, b, c = KvContext(1, owner=1), KvContext(2, owner=1), KvContext(3, owner=2)
    for ctx in (a, b, c):
        constraints.attach(ctx, _grammar(constraints), start=0)
    constraints.drop(a)
    constraints.drop_owner(1)
    assert [constraints.state(x) is None for x in (a, b, c)] == [True, True, False]
    assert constraints.apply(_forward(a, [5])) is None  # free again


# ---- compile errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "source", "message"),
    [
        ("json-schema", json.dumps({"type": "array", "uniqueItems": True}), "uniqueItems"),
        ("json-schema", json.dumps({"not": {"type": "string"}}), '"not"'),
        (
            "json-schema",
            json.dumps({"type": "string", "format": "colour"}),
            "Unknown format: colour",
        ),
        ("json-schema", '{"type": ', "is not JSON"),
        ("json-schema", "[1, 2]", "not list"),
        ("regex", "(ab", "unclosed group"),
        ("regex", "(?=a)b", "look-around"),
        ("lark", "start: number", 'unknown name: "number"'),
        ("kinds", "x", "unknown grammar kind"),
    ],
)
def test_what_the_matcher_cannot_take_is_an_error_naming_it(
    constraints: Constraints, kind: str, source: str, message: str
) -> None:
    with pytest.raises(HostError, match=r"not supported|not JSON|schema is an object|kind") as e:
        compile_grammar(kind, source, constraints.tokenizer())
    assert message in str(e.value)


def test_a_tokenizer_without_a_vocabulary_file_is_refused() -> None:
    from tests.runtime.byte_tokenizer import ByteTokenizer

    with pytest.raises(HostError, match="Hugging Face tokenizer"):
        matcher_tokenizer(ByteTokenizer(), 259)


# ---- the host functions: handles ----------------------------------------------------------------
class RecordingPort:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def grammar_constrain(self, ctx: int, grammar: str, start: int) -> None:
        self.calls.append(("constrain", (ctx, start)))

    def grammar_release_constraint(self, ctx: int) -> bool:
        self.calls.append(("release", ctx))
        return True

    def grammar_state(self, ctx: int) -> list[Any] | None:
        return [3, True, False]


def test_host_functions_check_every_handle(tokenizer: Any) -> None:
    served = HostModel("smollm2", tokenizer.vocab_size, 16, 8192, tokenizer)
    port = RecordingPort()
    host = InstanceHost(1, "p", [], HostServices(served), port, InstanceLimits())  # type: ignore[arg-type]
    model = host_model.open_model(host, None)
    ctx = host.handles.add("context", None)
    g = host_grammar.from_regex(host, model, "[0-9]+")
    host_grammar.constrain(host, ctx, g, 4)
    assert port.calls == [("constrain", (ctx, 4))]
    assert host_grammar.constraint_state(host, ctx) == ConstraintState(3, True, False)
    with pytest.raises(HostError, match="is a context, not a grammar"):
        host_grammar.constrain(host, ctx, ctx, 0)
    with pytest.raises(HostError, match="is a grammar, not a context"):
        host_grammar.constrain(host, g, g, 0)
    with pytest.raises(HostError, match="is a grammar, not a model"):
        host_grammar.from_lark(host, g, "start: /a/")
    host_grammar.release(host, g)
    with pytest.raises(HostError, match=r"grammar handle \d+ is not open"):
        host_grammar.constrain(host, ctx, g, 0)
    with pytest.raises(HostError, match="the limit is"):
        host_grammar.from_regex(host, model, "a" * (host_grammar.MAX_SOURCE + 1))
    assert host_grammar.release_constraint(host, ctx) and port.calls[-1] == ("release", ctx)
