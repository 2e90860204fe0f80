"""Fixtures for runtime tests: a session-wide build cache, built test components, runtimes.

Builds take 5-7 s each (plus ~3 s to compile), so each component is built once per session
into a temporary cache directory and every runtime shares it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(num_pages=64, page_size=4)


def make_runtime(engine: object, cache: Path, **limits: object) -> Runtime:
    return Runtime(engine, limits=InstanceLimits(**limits), cache=cache)  # type: ignore[arg-type]


@pytest.fixture
def runtime(fake_engine: FakeEngine, pie_cache: Path, probe_wasm: Path) -> Iterator[Runtime]:
    rt = make_runtime(fake_engine, pie_cache, cpu_seconds=10.0, wall_seconds=60.0)
    rt.add_component(probe_wasm, name="probe")
    rt.add_source(PROBE, name="probe-native", native=True)
    yield rt
    rt.close()
    assert_pool_whole(rt)


def assert_pool_whole(rt: Runtime) -> None:
    """Every page back in the pool (exports withdrawn), bookkeeping consistent."""
    for name in rt.exports.list():
        rt.exports.unexport(None, name)
    rt.pool.check_integrity()
    assert rt.pool.free_count == rt.pool.num_pages
