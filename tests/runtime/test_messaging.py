"""Messaging between inferlets and parent/child control, sandboxed."""

from __future__ import annotations

import json

import pytest

from pie.runtime.runtime import Runtime

pytestmark = pytest.mark.slow


def test_push_pull_and_broadcast_between_parent_and_children(runtime: Runtime) -> None:
    out = json.loads(runtime.run("probe", ["messaging", "4"]))
    assert out["ready"] == [f"worker {i}" for i in range(4)]
    assert out["results"] == [f"{i}:start" for i in range(4)]


def test_parent_cancels_a_child_and_sees_why(runtime: Runtime) -> None:
    message = runtime.run("probe", ["cancel-child"])
    assert "cancelled by its parent" in message


def test_bus_skips_withdrawn_pullers() -> None:
    from pie.runtime.messaging import MessageBus

    bus = MessageBus()
    withdrawn = bus.pull("q")
    withdrawn.cancel()
    live = bus.pull("q")
    bus.push("q", "one")
    bus.push("q", "two")
    assert live.result(0) == "one"
    assert bus.pull("q").result(0) == "two"
    sub = bus.subscribe("t")
    assert bus.broadcast("t", "hi") == 1
    assert sub.next().result(0) == "hi"
    sub.close()
    assert bus.broadcast("t", "gone") == 0
