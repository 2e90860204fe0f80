"""Abuse of host calls from a sandboxed inferlet: every misuse is an error it can catch."""

from __future__ import annotations

import json
import time
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
    # The patch is in this process: the instances run here, not in worker processes.
    with make_runtime(FakeEngine(), pie_cache, workers=0) as rt:
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


def _beside_a_generation(rt: Runtime, args: list[str]) -> str:
    """Runs probe `args` while another probe generates; that one must finish untouched."""
    bystander = rt.launch("probe", ["generate", "60", "bystander"])
    result = rt.launch("probe", args).wait(60)
    assert json.loads(bystander.wait(60)) == reference_generation(_tokens("bystander"), 60)
    return result


def _tokens(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode()]


def test_freed_handles_and_double_frees_are_errors(runtime: Runtime) -> None:
    errors = json.loads(_beside_a_generation(runtime, ["freed"]))
    assert all(errors.values()), {k: v for k, v in errors.items() if not v}
    for name in ("outputs-twice", "discard-twice", "wait-on-freed", "release-twice"):
        assert "not open in this inferlet" in errors[name], name
    for name in ("logits-after-release", "decoder-after-finish", "finish-twice"):
        assert "not open in this inferlet" in errors[name], name
    for name in ("next-after-unsubscribe", "unsubscribe-twice", "forward-on-closed"):
        assert "not open in this inferlet" in errors[name], name
    assert "not a child" in errors["cancel-a-forward"]


def test_malformed_and_oversized_arguments_are_errors(runtime: Runtime) -> None:
    errors = json.loads(_beside_a_generation(runtime, ["malformed"]))
    assert errors.pop("repeated-ids-ready") == 65536  # one id repeated: one lookup, not 65536
    assert all(errors.values()), {k: v for k, v in errors.items() if not v}
    assert "at most 65536" in errors["wait-any-over-limit"]
    assert (
        "text to encode of 1048577 characters; the limit is 1048576" in errors["encode-over-limit"]
    )
    for name in ("push-over-limit", "send-over-limit"):
        assert "the limit is 16777216" in errors[name], name
    assert "bans every token" in errors["logit-mask-bans-all"]
    # Values the bindings cannot carry are the SDK's clear errors, not a bare trap.
    assert "token id -1 is outside [0, 4294967295]" in errors["token-negative"]
    assert "token id 4294967296 is outside" in errors["token-past-u32"]
    assert "position -1 is outside" in errors["position-negative"]
    assert (
        "the prompt is 100000 tokens, the model's context is 4096" in errors["prompt-past-context"]
    )
    assert "outside the 1 new tokens" in errors["output-past-tokens"]
    assert "topics are 1 to 256 characters" in errors["empty-topic"]


def test_another_instances_export_is_not_ours_to_change(runtime: Runtime) -> None:
    holder = runtime.launch("probe", ["export-hold", "shared"])
    deadline = time.monotonic() + 30
    while "shared" not in runtime.exports.list() and time.monotonic() < deadline:
        time.sleep(0.01)
    out = json.loads(runtime.run("probe", ["foreign-export", "shared"]))
    assert all(out["errors"].values()), out["errors"]
    prefix = _tokens("shared prefix text")
    assert out["tokens"] == reference_generation(prefix + _tokens("zz"), 4)
    # The writes on top copied the shared last page: a later reader sees the prefix intact.
    later = json.loads(runtime.run("probe", ["continue-export", "shared"]))
    assert later == reference_generation(prefix + _tokens("!"), 4)
    holder.cancel("test over")
    with pytest.raises(InstanceFailed, match="test over"):
        holder.wait(10)
