"""The structured-output inferlets on the real SmolLM2: what each claims, sandboxed and natively.

Each inferlet is built once and run in both modes on the same input; the outputs must be equal.
The sandboxed instances run in a worker process, so every grammar call crosses to the control
process, where the matchers live. JSON answers are checked with `jsonschema`, regex answers with
Python's `re`, arithmetic answers by evaluating them.
"""

from __future__ import annotations

import ast
import json
import re
import runpy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pie.runtime.errors import InstanceFailed
from pie.runtime.runtime import Runtime
from tests.runtime.conftest import ROOT, assert_pool_whole, make_runtime, run_both

pytestmark = pytest.mark.slow  # builds components, runs the real model

INFERLETS = ROOT / "inferlets"
NAMES = ["json_output", "regex_output", "grammar_output"]
DEFAULT_SCHEMA = runpy.run_path(str(INFERLETS / "json_output.py"))["SCHEMA"]
SCHEMAS = [
    (
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "country": {"type": "string", "enum": ["France", "Italy", "Spain", "Germany"]},
                # bounded: a grammar keeps every prefix valid, it cannot make the model stop
                "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
            },
            "required": ["city", "country", "population_millions"],
            "additionalProperties": False,
        },
        "Tell me about the capital of France.",
    ),
    (
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"step": {"type": "integer"}, "action": {"type": "string"}},
                "required": ["step", "action"],
                "additionalProperties": False,
            },
            "minItems": 2,
            "maxItems": 3,
        },
        "List the steps to make tea.",
    ),
]


@pytest.fixture(scope="module")
def rt(pie_cache: Path) -> Iterator[Runtime]:
    import torch

    from pie.engine.engine import Engine

    engine = Engine.load(None, dtype=torch.float32, num_pages=256)
    with make_runtime(engine, pie_cache, workers=1) as runtime:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda n: runtime.add_source(INFERLETS / f"{n}.py", name=n), NAMES))
        for name in NAMES:
            runtime.add_source(INFERLETS / f"{name}.py", name=f"{name}-native", native=True)
        yield runtime
        assert not runtime.instances()
        assert_pool_whole(runtime)


def _complete_json(out: dict[str, Any], schema: Any) -> None:
    assert out["parsed"] and out["accepting"] and out["finish"] == "stop-token", out
    assert json.loads(out["text"]) == out["value"]
    jsonschema.validate(out["value"], schema)


# ---- json_output ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cat(rt: Runtime) -> Any:
    return run_both(rt, "json_output", ["Describe a cat."])


def test_json_output_fits_the_schema_where_free_text_is_not_json(rt: Runtime, cat: Any) -> None:
    _complete_json(cat, DEFAULT_SCHEMA)
    free = run_both(rt, "json_output", ["--free", "Describe a cat."])
    assert not free["parsed"] and free["accepting"] is None  # the same prompt, no grammar: prose


@pytest.mark.parametrize(("schema", "prompt"), SCHEMAS, ids=["object", "array"])
def test_json_output_validates_on_other_schemas(rt: Runtime, schema: Any, prompt: str) -> None:
    out = run_both(rt, "json_output", ["--schema", json.dumps(schema), prompt])
    _complete_json(out, schema)


def test_json_output_thinks_then_answers_in_the_same_context(rt: Runtime) -> None:
    schema = {"type": "integer", "minimum": 0, "maximum": 100}
    args = ["--think", "--schema", json.dumps(schema), "How many legs do three cats have?"]
    out = run_both(rt, "json_output", args)
    assert out["thought"] and not out["thought"].lstrip().isdigit()  # free text came first
    _complete_json(out, schema)


def test_a_schema_keyword_the_matcher_lacks_fails_naming_it(rt: Runtime) -> None:
    schema = json.dumps({"type": "object", "not": {"required": ["a"]}})
    for name, native in (("json_output", False), ("json_output-native", True)):
        with pytest.raises(InstanceFailed, match=r'not supported: Unimplemented keys: \["not"\]'):
            rt.run(name, ["--schema", schema, "Hi"], native=native)


def test_the_programs_own_loop_gets_the_same_tokens_as_the_hosts(rt: Runtime, cat: Any) -> None:
    own = run_both(rt, "json_output", ["--own-loop", "Describe a cat."])
    assert own == cat  # the mask is applied the same on both paths (forward, delegated loop)


# ---- regex_output ---------------------------------------------------------------------------------
def test_regex_output_forks_each_match_the_pattern(rt: Runtime) -> None:
    out = run_both(rt, "regex_output", [])
    assert len(out["answers"]) == 3 and all(out["matches"])
    assert all(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", a) for a in out["answers"])
    assert len(set(out["answers"])) > 1  # the seeds differ: the forks sampled apart
    choice = run_both(
        rt, "regex_output", ["--pattern", "(yes|no)", "--samples", "2", "Is ice cold?"]
    )
    assert all(answer in ("yes", "no") for answer in choice["answers"])


# ---- grammar_output ---------------------------------------------------------------------------------
def _value(expression: str) -> float:
    tree = ast.parse(expression, mode="eval")
    assert all(
        isinstance(node, ast.Expression | ast.BinOp | ast.Constant | ast.operator)
        for node in ast.walk(tree)
    ), expression
    return float(eval(compile(tree, "<answer>", "eval")))  # only numbers and + - * /


def test_grammar_output_always_parses_and_each_retry_starts_over(rt: Runtime) -> None:
    out = run_both(rt, "grammar_output", ["24", "Use the numbers 4, 5 and 6."])
    assert 1 <= len(out["tries"]) <= 3
    assert out["hit"] == (out["value"] == 24) and (out["hit"] or len(out["tries"]) == 3)
    for attempt in out["tries"]:
        # after a truncate the matcher starts over: each try is one whole expression
        assert attempt["value"] == _value(attempt["expression"])
