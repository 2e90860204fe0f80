"""Inferlets written in JavaScript (inferlets/js/): built by componentize-js against the same WIT
world, run by the same runtime as Python ones, and each prints what its Python twin prints.

Each JS program runs sandboxed (a JS inferlet has no native mode) beside its Python twin run
sandboxed and natively; the three outputs must be equal: on the fake engine (exact tokens and the
work done) and on the real SmolLM2 (greedy, with `pie run` as a subprocess once). The toolchain
is installed with npm into the session's build cache on first use (the slow part, ~30 s); the
module is skipped, with the reason, where Node.js or npm is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pie.runtime.build import build_inferlet
from pie.runtime.build_js import ensure_toolchain, missing_tools
from pie.runtime.errors import BuildError, InstanceFailed, last_line
from pie.runtime.runtime import Runtime
from pie.runtime.session import QueueSession
from tests.runtime.conftest import ROOT, assert_pool_whole, make_runtime
from tests.runtime.fakes import OFFSET, FakeEngine, reference_generation

pytestmark = pytest.mark.slow  # installs componentize-js and builds components

INFERLETS = ROOT / "inferlets"
TWINS = ("text_completion", "best_of_n")
SYSTEM = "You are a helpful assistant."


def _chat(user: str, system: str | None = None) -> list[int]:
    head = "" if system is None else f"[system]{system}\n"
    return [b + OFFSET for b in f"{head}[user]{user}\n[assistant]".encode()]


def _text(tokens: list[int]) -> str:
    return bytes(t - OFFSET for t in tokens).decode()


@pytest.fixture(scope="module")
def built(pie_cache: Path) -> dict[str, Path]:
    """Both JS inferlets built once (`pie build`'s path: `build_inferlet` on the .js file)."""
    problem = missing_tools()
    if problem:
        pytest.skip(problem)
    ensure_toolchain()  # the one npm install, before the builds run side by side
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda n: build_inferlet(INFERLETS / "js" / f"{n}.js"), TWINS))
    return dict(zip(TWINS, paths, strict=True))


def _register(rt: Runtime) -> None:
    """Each JS inferlet (from its source: the build is cached) and its Python twin, both ways."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: rt.add_source(INFERLETS / f"{n}.py", name=f"py-{n}"), TWINS))
    for name in TWINS:
        rt.add_source(INFERLETS / "js" / f"{name}.js", name=f"js-{name}")
        rt.add_source(INFERLETS / f"{name}.py", name=f"native-{name}", native=True)


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return FakeEngine(num_pages=256, page_size=4)


@pytest.fixture(scope="module")
def fake_rt(fake: FakeEngine, pie_cache: Path, built: dict[str, Path]) -> Iterator[Runtime]:
    with make_runtime(fake, pie_cache, workers=0) as rt:
        _register(rt)
        yield rt


@pytest.fixture
def rt(fake_rt: Runtime) -> Iterator[Runtime]:
    yield fake_rt
    assert not fake_rt.instances()
    assert_pool_whole(fake_rt)


def run_three(
    rt: Runtime,
    name: str,
    args: list[str],
    fake: FakeEngine | None = None,
    parse: Callable[[str], Any] = str,
) -> Any:
    """Runs `name` in JS (wasm) and in Python (wasm, then native); the results (as `parse`
    reads them), the text each streamed to its client and (on the fake) the tokens each ran
    must be equal. Returns the result and the streamed text."""
    seen = []
    for program, native in ((f"js-{name}", False), (f"py-{name}", False), (f"native-{name}", True)):
        if fake is not None:
            fake.batches.clear()
        session = QueueSession()  # keeps what the program sends
        result = rt.run(program, args, native=native, session=session)
        streamed = "".join(text for _, text in session.sent)
        ran = None if fake is None else [len(s.tokens) for b in fake.batches for s in b.sequences]
        seen.append((parse(result), streamed, None if ran is None else sum(ran)))
    assert seen[0] == seen[1] == seen[2]
    return seen[0][:2]


# ---- on the fake engine --------------------------------------------------------------------------
def test_text_completion_in_js_streams_and_returns_what_python_does(
    rt: Runtime, fake: FakeEngine
) -> None:
    result, streamed = run_three(rt, "text_completion", ["Hi", "there"], fake)
    # The fake never samples a stop token: all 256 greedy tokens, streamed as they came.
    assert result == streamed == _text(reference_generation(_chat("Hi there", SYSTEM), 256))


def test_best_of_n_in_js_scores_and_shares_pages_as_python_does(
    rt: Runtime, fake: FakeEngine
) -> None:
    # run_three checks the JS one ran exactly the Python one's tokens: the prompt once, shared
    # by the forks, then each answer and its one-forward rescoring.
    # JSON equal as values: JS writes `-1` and `{"best":0`, Python `-1.0` and `{"best": 0`.
    out, _ = run_three(rt, "best_of_n", ["3", "Hi"], fake, parse=json.loads)
    answer = _text(reference_generation(_chat("Hi"), 48))
    assert out == {"best": 0, "text": answer, "scores": [-1, -1, -1], "texts": [answer] * 3}


def test_an_error_in_js_ends_the_run_as_in_python(rt: Runtime) -> None:
    long_prompt = ["x" * 5000]  # past the fake's 4096 positions: refused before any forward
    failures = set()
    for program in ("js-text_completion", "py-text_completion", "native-text_completion"):
        with pytest.raises(InstanceFailed) as failed:
            rt.run(program, long_prompt, native=program.startswith("native"))
        failures.add(last_line(failed.value).split(": ", 1)[1])  # past the exception's type
    tokens = len(_chat(long_prompt[0], SYSTEM))
    assert failures == {f"the prompt is {tokens} tokens, the model's context is 4096: shorten it"}


# ---- the build's own errors, before any toolchain --------------------------------------------------
def test_a_syntax_error_names_the_js_line(tmp_path: Path) -> None:
    if missing_tools():
        pytest.skip(str(missing_tools()))
    source = tmp_path / "broken.js"
    source.write_text("export function run(input) {\n  return input +;\n}\n")
    with pytest.raises(BuildError) as failed:
        build_inferlet(source)
    assert failed.value.location == f"{source}:2" and "SyntaxError" in str(failed.value)


@pytest.mark.parametrize(
    ("command", "without_node", "refusal"),
    [
        (
            "build",
            True,
            "building a .js inferlet needs Node.js and npm (node and npm not found on PATH); "
            "install Node.js 20 or later",
        ),
        ("run", False, "--native runs Python inferlets in-process; a .js one runs as wasm only"),
    ],
)
def test_what_a_js_inferlet_cannot_do_is_refused_in_one_line(
    tmp_path: Path, command: str, without_node: bool, refusal: str
) -> None:
    if not without_node and missing_tools():
        pytest.skip(str(missing_tools()))
    env = {**os.environ, "PATH": str(tmp_path)} if without_node else dict(os.environ)
    native = ["--native"] if command == "run" else []
    done = subprocess.run(
        [sys.executable, "-m", "pie.cli", command, "inferlets/js/text_completion.js", *native],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"pie {command}: {refusal}"  # before any build or model load


# ---- on the real model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_rt(pie_cache: Path, built: dict[str, Path]) -> Iterator[Runtime]:
    pytest.importorskip("pie.engine.tokenizer")
    import torch

    from pie.engine.engine import Engine

    engine = Engine.load(None, dtype=torch.float32, num_pages=64)
    with make_runtime(engine, pie_cache, workers=0) as rt:
        _register(rt)
        yield rt
        assert_pool_whole(rt)


def test_text_completion_in_js_answers_as_python_does_on_smollm2(real_rt: Runtime) -> None:
    prompt = "What is the capital of France?"
    result, streamed = run_three(real_rt, "text_completion", [prompt])
    assert result == streamed and "Paris" in result
    # The same program through `pie run`, as a user runs it (the session's build cache).
    done = subprocess.run(
        [sys.executable, "-m", "pie.cli", "run", "inferlets/js/text_completion.js",
         "--dtype", "float32", "--", prompt],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == result + "\n"


def test_best_of_n_in_js_draws_and_scores_as_python_does_on_smollm2(real_rt: Runtime) -> None:
    # Seeded sampling draws the same tokens in any batch: equal answers and equal scores.
    out, _ = run_three(
        real_rt, "best_of_n", ["3", "Give a one-line definition of entropy."], parse=json.loads
    )
    assert len(set(out["texts"])) == 3 and out["scores"][out["best"]] == max(out["scores"])
