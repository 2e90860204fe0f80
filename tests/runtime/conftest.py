"""Fixtures for runtime tests: a session-wide build cache, built test components, runtimes.

Builds take 5-7 s each (plus ~3 s to compile), so each component is built once per session
into a temporary cache directory and every runtime shares it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pie.runtime.limits import InstanceLimits
from pie.runtime.runtime import Runtime
from tests.runtime.fakes import FakeEngine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROBE = HERE / "inferlets" / "probe.py"
TEXT_COMPLETION = ROOT / "inferlets" / "text_completion.py"


@pytest.fixture(scope="session")
def pie_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("pie-cache")
    old = os.environ.get("PIE_CACHE_DIR")
    os.environ["PIE_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PIE_CACHE_DIR", None)
    else:
        os.environ["PIE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def probe_wasm(pie_cache: Path) -> Path:
    from pie.runtime.build import build_inferlet

    return build_inferlet(PROBE)


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(num_pages=64, page_size=4)


# Worker processes for the runtimes these tests make (0: instances on threads of the test
# process). The suite runs with 2; PIE_TEST_WORKERS=0 runs it in-process.
WORKERS = int(os.environ.get("PIE_TEST_WORKERS", "2"))


def make_runtime(
    engine: object, cache: Path, workers: int | None = None, **limits: object
) -> Runtime:
    count = WORKERS if workers is None else workers
    return Runtime(engine, limits=InstanceLimits(**limits), cache=cache, workers=count)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def shared_runtime(fake_engine: FakeEngine, pie_cache: Path, probe_wasm: Path) -> Iterator[Runtime]:
    """One runtime (and its worker processes) per test module: starting workers costs ~0.5 s."""
    rt = make_runtime(fake_engine, pie_cache, cpu_seconds=10.0, wall_seconds=60.0)
    rt.add_component(probe_wasm, name="probe")
    rt.add_source(PROBE, name="probe-native", native=True)
    yield rt
    rt.close()
    assert_pool_whole(rt)


@pytest.fixture
def runtime(shared_runtime: Runtime, fake_engine: FakeEngine) -> Iterator[Runtime]:
    """The module's runtime, checked after each test: every instance ended, every page back."""
    fake_engine.batches.clear()
    yield shared_runtime
    deadline = time.monotonic() + 10.0
    while shared_runtime.instances() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not shared_runtime.instances(), "instances still running after the test"
    assert_pool_whole(shared_runtime)


def run_both(rt: Runtime, name: str, args: list[str], **kwargs: Any) -> Any:
    """Runs program `name` sandboxed, then `name-native` natively, with the same arguments and
    limits; the two results must be equal. Returns it parsed as JSON."""
    wasm = rt.run(name, args, **kwargs)
    native = rt.run(f"{name}-native", args, native=True, **kwargs)
    assert wasm == native
    return json.loads(wasm)


def assert_pool_whole(rt: Runtime) -> None:
    """Every page back in the pool (exports withdrawn), bookkeeping consistent."""
    for name in rt.exports.list():
        rt.exports.unexport(None, name)
    rt.pool.check_integrity()
    assert rt.pool.free_count == rt.pool.num_pages


def pie_run_chat_on_stdin(*extra: str) -> subprocess.CompletedProcess[str]:
    """`printf 'q1\\nq2\\n' | pie run inferlets/chat.py [extra]`, in this session's cache."""
    return subprocess.run(
        [sys.executable, "-m", "pie.cli", "run", str(ROOT / "inferlets" / "chat.py"), *extra],
        cwd=ROOT,
        env=dict(os.environ),  # the session's PIE_CACHE_DIR: one build
        input="q1\nq2\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
