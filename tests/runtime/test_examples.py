"""The example inferlets and the guest's stdio, on the fake engine.

The examples run natively here (the same SDK and host implementation as in the sandbox; the
sandboxed path is covered by the probe and text-completion tests), so no extra builds.
"""

from __future__ import annotations

import logging
import runpy
from pathlib import Path

import pytest

from pie.runtime.runtime import Runtime
from tests.runtime.conftest import ROOT, assert_pool_whole
from tests.runtime.fakes import OFFSET, FakeEngine, reference_generation


def _tokens(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode()]


def _text(tokens: list[int]) -> str:
    return bytes(t - OFFSET for t in tokens).decode()


@pytest.fixture
def big_runtime(pie_cache: Path) -> Runtime:
    return Runtime(FakeEngine(num_pages=512), cache=pie_cache)


def test_parallel_generation_forks_share_the_prompt(big_runtime: Runtime) -> None:
    engine = big_runtime.engine
    with big_runtime as rt:
        program = rt.add_source(ROOT / "inferlets" / "parallel_generation.py", native=True)
        out = rt.run(program, ["3", "Hi"], native=True)
        assert_pool_whole(rt)
    prompt = _tokens("[user]Hi\n[assistant]")
    answer = _text(reference_generation(prompt, 64)).strip()
    assert out == "\n\n".join(f"[{i}] {answer}" for i in range(3))
    ran = sum(len(s.tokens) for b in engine.batches for s in b.sequences)
    assert ran == (len(prompt) - 1) + 3 * 64  # the prompt ran once, not three times


def test_prefix_sharing_children_import_the_exported_prefix(big_runtime: Runtime) -> None:
    engine = big_runtime.engine
    questions = ["What is a KV cache?", "Why batch?"]
    with big_runtime as rt:
        program = rt.add_source(ROOT / "inferlets" / "prefix_sharing.py", native=True)
        out = rt.run(program, questions, native=True)
        assert rt.exports.list() == []  # the parent withdrew its export
        assert_pool_whole(rt)
    system = runpy.run_path(str(ROOT / "inferlets" / "prefix_sharing.py"))["SYSTEM"]
    prefix = f"[system]{system}\n"
    for q in questions:
        full = _tokens(f"{prefix}[user]{q}\n[assistant]")
        assert f"Q: {q}\nA: {_text(reference_generation(full, 96)).strip()}" in out
    ran = sum(len(s.tokens) for b in engine.batches for s in b.sequences)
    assert ran == len(_tokens(prefix)) + sum(
        len(_tokens(f"[user]{q}\n[assistant]")) + 95 for q in questions
    )


@pytest.mark.slow
def test_guest_stdout_and_stderr_reach_the_log_tagged_with_the_instance(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pie.inferlet")
    instance = runtime.launch("probe", ["print"])
    assert instance.wait(10) == "printed"
    lines = {(r.name, r.getMessage()) for r in caplog.records}
    assert (f"pie.inferlet.{instance.id}", "[stdout] hello on stdout") in lines
    assert (f"pie.inferlet.{instance.id}", "[stderr] hello on stderr") in lines
