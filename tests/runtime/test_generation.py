"""Generation through inferlets on the fake engine: exact tokens, fork sharing, native mode."""

from __future__ import annotations

import json

import pytest

from pie.runtime.runtime import Runtime
from pie.runtime.session import QueueSession
from tests.runtime.conftest import TEXT_COMPLETION
from tests.runtime.fakes import OFFSET, FakeEngine, reference_generation

pytestmark = pytest.mark.slow


def _tokens(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode()]


@pytest.mark.parametrize("native", [False, True])
def test_greedy_generation_equals_the_reference(runtime: Runtime, native: bool) -> None:
    program = "probe-native" if native else "probe"
    out = json.loads(runtime.run(program, ["generate", "40", "hello world"], native=native))
    assert out == reference_generation(_tokens("hello world"), 40)


def test_native_output_equals_sandboxed_output(runtime: Runtime) -> None:
    sessions = QueueSession(), QueueSession()
    wasm = runtime.launch("probe", ["stream", "30", "abc"], session=sessions[0])
    native = runtime.launch(
        "probe-native", ["stream", "30", "abc"], session=sessions[1], native=True
    )
    assert wasm.wait(20) == native.wait(20)
    assert sessions[0].text_of(wasm.id) == sessions[1].text_of(native.id) == wasm.wait()


def test_forks_share_the_prefix_and_continue_independently(
    runtime: Runtime, fake_engine: FakeEngine
) -> None:
    outs = json.loads(runtime.run("probe", ["fork", "6", "3"]))
    prefix = _tokens("shared prefix " * 3)
    assert outs == [reference_generation(prefix + _tokens(str(i)), 6) for i in range(3)]
    ran = sum(len(s.tokens) for b in fake_engine.batches for s in b.sequences)
    # The prefix ran once (not once per fork): prefix minus its last token, then per fork
    # the last prefix token + digit, then 5 decode steps.
    assert ran == (len(prefix) - 1) + 3 * (2 + 5)
    # The forks' passes leave the guest together (execute-many), so they can share batches.
    assert max(len(b.sequences) for b in fake_engine.batches) == 3


def test_text_completion_example_streams_its_answer(pie_cache: object) -> None:
    with Runtime(FakeEngine(num_pages=128)) as rt:
        program = rt.add_source(TEXT_COMPLETION)
        session = QueueSession()
        instance = rt.launch(program, ["Why", "is", "the", "sky", "blue?"], session=session)
        result = instance.wait(30)
    prompt = _tokens(
        "[system]You are a helpful assistant.\n[user]Why is the sky blue?\n[assistant]"
    )
    expected = bytes(t - OFFSET for t in reference_generation(prompt, 256)).decode()
    assert result == expected == session.text_of(instance.id)
