"""Abuse of host calls from a sandboxed inferlet: every misuse is an error it can catch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wasmtime.component import _enter

from pie.runtime import wasm_bindings
from pie.runtime.errors import InstanceFailed
from pie.runtime.limits import InstanceLimits
from pie.runtime.runtime import Runtime
from tests.runtime.conftest import make_runtime
from tests.runtime.fakes import OFFSET, FakeEngine, reference_generation

pytestmark = pytest.mark.slow


def test_misuse_comes_back_as_errors(runtime: Runtime) -> None:
    errors = json.loads(runtime.run("probe", ["abuse"]))
    assert all(errors.values()), {k: v for k, v in errors.items() if not v}
    assert "not open in this inferlet" in errors["foreign-context"]
    assert "is a model, not a context" in errors["model-as-context"]
    assert "sum to 2" in errors["mask-bad-runs"]
    assert "outside the vocabulary" in errors["token-out-of-vocab"]
    assert "1 to 4096 tokens" in errors["huge-forward"]
    assert "unknown program" in errors["unknown-program"]


def test_double_close_is_an_error_not_a_crash(runtime: Runtime) -> None:
    assert "not open in this inferlet" in runtime.run("probe", ["double-close"])


def test_handle_flood_stops_at_the_open_handle_limit(runtime: Runtime) -> None:
    made, error = json.loads(
        runtime.run("probe", ["handle-flood"], limits=InstanceLimits(open_handles=50))
    )
    assert made == 49  # the default model handle is the 50th
    assert "open-handle limit reached (50)" in error


def test_fork_bomb_stops_at_the_depth_limit(runtime: Runtime) -> None:
    out = json.loads(runtime.run("probe", ["fork-bomb", "0"], limits=InstanceLimits(max_depth=3)))
    assert out["depth"] == 3 and "depth limit" in out["error"]


def test_unknown_mode_fails_with_the_guest_traceback(runtime: Runtime) -> None:
    with pytest.raises(InstanceFailed, match="KeyError: 'no-such-mode'") as failed:
        runtime.run("probe", ["no-such-mode"])
    assert "probe.py" in str(failed.value)  # frames name the user's real file


def test_a_host_fault_ends_only_the_calling_instance(
    monkeypatch: pytest.MonkeyPatch, pie_cache: Path, probe_wasm: Path
) -> None:
    """A Python exception must never reach wasmtime's module-global parking spot."""

    def broken(host: object) -> str:
        raise RuntimeError("boom")

    monkeypatch.setitem(
        wasm_bindings.FUNCTIONS["runtime"], "version", (broken, wasm_bindings.PLAIN)
    )
    with make_runtime(FakeEngine(), pie_cache) as rt:
        rt.add_component(probe_wasm, name="probe")
        bystander = rt.launch("probe", ["generate", "60", "ok"])
        victims = [rt.launch("probe", ["version"]) for _ in range(3)]
        for victim in victims:
            with pytest.raises(
                InstanceFailed, match=r"internal error in host call runtime.version"
            ):
                victim.wait(10)
        assert json.loads(bystander.wait(10)) == reference_generation(
            [b + OFFSET for b in b"ok"], 60
        )
    assert _enter.LAST_EXCEPTION is None
