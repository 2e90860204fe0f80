"""Sandbox and limits: whatever way an instance ends, only it ends, and its pages come back."""

from __future__ import annotations

import json
import time

import pytest

from pie.runtime.errors import InstanceFailed
from pie.runtime.limits import InstanceLimits
from pie.runtime.runtime import Runtime
from tests.runtime.fakes import OFFSET, reference_generation

pytestmark = pytest.mark.slow


def _failure(rt: Runtime, args: list[str], **limits: object) -> tuple[str, float]:
    """Runs probe with `args` next to a generating probe; returns (error, seconds to fail)."""
    bystander = rt.launch("probe", ["generate", "120", "hello"])
    started = time.monotonic()
    victim = rt.launch("probe", args, limits=InstanceLimits(**limits) if limits else None)  # type: ignore[arg-type]
    with pytest.raises(InstanceFailed) as failed:
        victim.wait(30)
    took = time.monotonic() - started
    tokens = json.loads(bystander.wait(30))
    assert tokens == reference_generation([b + OFFSET for b in b"hello"], 120)
    return str(failed.value), took


def test_infinite_loop_stops_within_a_second_of_its_cpu_limit(runtime: Runtime) -> None:
    error, took = _failure(runtime, ["loop"], cpu_seconds=1.0)
    assert "CPU-time limit of 1.0 s" in error
    assert took < 2.0


def test_wall_time_limit_ends_a_waiting_instance(runtime: Runtime) -> None:
    error, took = _failure(runtime, ["hold-pages", "10"], wall_seconds=0.5)
    assert "wall-time limit" in error
    assert took < 1.5


def test_memory_bomb_fails_at_its_cap(runtime: Runtime) -> None:
    error, _ = _failure(runtime, ["membomb"], memory_bytes=96 * 2**20)
    assert "MemoryError" in error or "memory" in error.lower()


def test_trap_mid_generation_ends_only_that_instance(runtime: Runtime) -> None:
    error, _ = _failure(runtime, ["trap"])
    assert "ended" in error and ("trap" in error or "stack" in error)


@pytest.mark.parametrize("mode", ["open", "socket"])
def test_no_file_or_socket_without_a_grant(runtime: Runtime, mode: str) -> None:
    error, _ = _failure(runtime, [mode])
    assert "Error" in error  # the guest's own OSError/PermissionError, with its traceback
    assert "connected" not in error and "root:" not in error


def test_cancel_releases_held_pages(runtime: Runtime) -> None:
    victim = runtime.launch("probe", ["hold-pages", "40"])
    deadline = time.monotonic() + 10
    while runtime.pool.used_count == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runtime.pool.used_count > 0
    victim.cancel("test cancel")
    with pytest.raises(InstanceFailed, match="test cancel"):
        victim.wait(5)
    assert runtime.pool.free_count == runtime.pool.num_pages


def test_kv_quota_is_a_catchable_error(runtime: Runtime) -> None:
    instance = runtime.launch(
        "probe", ["generate", "50", "x" * 30], limits=InstanceLimits(kv_pages=4)
    )
    with pytest.raises(InstanceFailed, match="quota"):
        instance.wait(10)
