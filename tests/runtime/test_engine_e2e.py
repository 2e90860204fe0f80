"""End to end on the real SmolLM2 engine: inferlet output equals the engine driven directly,
native equals sandboxed, and `pie run` works as the README says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pie.runtime.runtime import Runtime
from pie.runtime.session import QueueSession
from tests.runtime.conftest import TEXT_COMPLETION

pytest.importorskip("pie.engine.tokenizer")
pytestmark = pytest.mark.slow

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def engine() -> object:
    from pie.engine.engine import Engine

    return Engine.load(None, num_pages=256)


def test_greedy_inferlet_equals_the_engine_token_for_token(
    engine: object, pie_cache: Path, probe_wasm: Path
) -> None:
    from pie.engine.generate import generate

    with Runtime(engine, cache=pie_cache) as rt:
        rt.add_component(probe_wasm, name="probe")
        through_inferlet = json.loads(rt.run("probe", ["generate", "24", PROMPT]))
        rt.pool.check_integrity()
        assert rt.pool.free_count == rt.pool.num_pages
    direct = generate(engine, [engine.tokenizer.encode(PROMPT)], 24)[0]  # type: ignore[attr-defined]
    assert through_inferlet == direct


def test_a_hundred_concurrent_inferlets_each_equal_the_engine(
    engine: object, pie_cache: Path, probe_wasm: Path
) -> None:
    """100 sandboxed generations at once: every one equals the engine driven directly, the
    scheduler really batched them, and every page came back."""
    from pie.engine.generate import generate

    prompts = [f"{i} times two is" for i in range(100)]
    with Runtime(engine, cache=pie_cache) as rt:
        rt.add_component(probe_wasm, name="probe")
        instances = [rt.launch("probe", ["generate", "8", p]) for p in prompts]
        outputs = [json.loads(x.wait(120)) for x in instances]
        stats = rt.scheduler.stats
        rt.pool.check_integrity()
        assert rt.pool.free_count == rt.pool.num_pages
    tokenizer = engine.tokenizer  # type: ignore[attr-defined]
    direct = generate(engine, [tokenizer.encode(p) for p in prompts], 8)  # type: ignore[arg-type]
    assert outputs == direct
    assert stats.forwards == 100 * 8 and stats.mean_sequences_per_step > 1


def test_text_completion_native_equals_sandboxed(engine: object, pie_cache: Path) -> None:
    with Runtime(engine, cache=pie_cache) as rt:
        wasm = rt.add_source(TEXT_COMPLETION)
        native = rt.add_source(TEXT_COMPLETION, name="native", native=True)
        sessions = QueueSession(), QueueSession()
        a = rt.launch(wasm, ["Name a fruit."], session=sessions[0])
        b = rt.launch(native, ["Name a fruit."], session=sessions[1], native=True)
        assert a.wait(120) == b.wait(120)
        assert sessions[0].text_of(a.id) == sessions[1].text_of(b.id) == a.wait()
        assert a.wait().strip()


def test_pie_run_streams_and_prints(capsys: pytest.CaptureFixture[str], pie_cache: Path) -> None:
    from pie.cli import main

    assert main(["run", str(TEXT_COMPLETION), "--kv-pages", "128", "--", "Say hello."]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "smollm2" in err.lower() and "wasm" in err
