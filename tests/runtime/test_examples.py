"""The example inferlets and the guest's stdio, on the fake engine.

The examples run natively here (the same SDK and host implementation as in the sandbox; the
sandboxed path is covered by the probe and text-completion tests), so no extra builds.
"""

from __future__ import annotations

import logging
import runpy
import time
from pathlib import Path

import pytest

from pie.runtime.runtime import Runtime
from pie.runtime.session import InputClosed, QueueSession
from tests.runtime.conftest import ROOT, assert_pool_whole, make_runtime, pie_run_chat_on_stdin
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


# ---- end of input: the chat example ends when the client closes its input -------------------------
CHAT = ROOT / "inferlets" / "chat.py"


def _chat_session(*lines: str) -> QueueSession:
    session = QueueSession()
    for line in lines:
        session.put_text(line)
    session.close_input()
    return session


def test_chat_answers_each_line_then_ends_at_end_of_input(big_runtime: Runtime) -> None:
    session = _chat_session("q1", "q2")
    with big_runtime as rt:
        program = rt.add_source(CHAT, native=True)
        out = rt.launch(program, [], session=session, native=True).wait(30)
        assert_pool_whole(rt)
    assert out == "[the client closed its input; turns: 2]"
    # The second turn continued the first's KV: it answers what a fresh run of the whole
    # conversation answers.
    first = "[system]You are a helpful assistant.\n[user]q1\n[assistant]"
    answer1 = _text(reference_generation(_tokens(first), 256))
    second = f"{first}{answer1}\n[user]q2\n[assistant]"
    answer2 = _text(reference_generation(_tokens(second), 256))
    assert session.text_of(1) == f"{answer1}\n{answer2}\n"


@pytest.mark.slow
def test_end_of_input_reaches_a_waiting_receive_in_a_worker(pie_cache: Path) -> None:
    """The sandboxed chat, in a worker process: its receive is pending when input closes."""
    with make_runtime(FakeEngine(num_pages=512), pie_cache, workers=1) as rt:
        program = rt.add_source(CHAT)
        session = QueueSession()
        instance = rt.launch(program, [], session=session)
        time.sleep(0.5)
        session.put_text("q1")
        time.sleep(0.2)
        session.close_input()
        assert instance.wait(30) == "[the client closed its input; turns: 1]"
        assert_pool_whole(rt)


def test_receive_raises_end_of_input_after_the_queued_messages(
    big_runtime: Runtime, tmp_path: Path
) -> None:
    source = tmp_path / "eoi.py"
    source.write_text(
        "from pie.sdk import EndOfInput, messages, receive, receive_blob\n\n"
        "async def main(args):\n"
        "    seen = [m async for m in messages()]\n"
        "    for take in (receive, receive, receive_blob):\n"
        "        try:\n"
        "            await take()\n"
        "        except EndOfInput as e:\n"
        "            seen.append(type(e).__name__ + ':' + str(e).split(':')[0])\n"
        "    return ','.join(seen)\n"
    )
    session = QueueSession()
    session.put_text("a")
    session.put_text("b")
    session.close_input()
    session.close_input()  # twice: harmless
    with pytest.raises(InputClosed, match="end-of-input"):
        session.put_text("late")
    with big_runtime as rt:
        program = rt.add_source(source, native=True)
        out = rt.launch(program, [], session=session, native=True).wait(10)
    assert out == "a,b" + ",EndOfInput:end-of-input" * 3


@pytest.mark.slow
def test_chat_ends_by_itself_at_the_end_of_stdin(pie_cache: Path) -> None:
    """`printf 'q1\\nq2\\n' | pie run inferlets/chat.py` (sandboxed, default workers) exits 0."""
    done = pie_run_chat_on_stdin()
    assert done.returncode == 0, done.stderr
    assert "[the client closed its input; turns: 2]" in done.stdout
