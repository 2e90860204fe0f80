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


def test_the_bus_budget_counts_host_bytes_and_queues() -> None:
    from pie.runtime.errors import HostError
    from pie.runtime.messaging import QUEUE_BYTES, MessageBus

    # Four-byte characters cost four bytes each: 300 of 1,000 characters pass a 1,000-character
    # reckoning but not a 4 KB budget counted in bytes.
    bus = MessageBus(max_bytes=4096)
    with pytest.raises(HostError, match="unread messages"):
        for _ in range(300):
            bus.push("wide", "\U0001f600" * 1000)
    assert bus.held <= bus.max_bytes
    # One-message topics: each queue costs its own bytes, so a spread of them is bounded too.
    bus = MessageBus(max_bytes=64 * QUEUE_BYTES)
    with pytest.raises(HostError, match="unread messages"):
        for i in range(10_000):
            bus.push(f"topic-{i}", "x")
    assert len(bus.queues) < 64
    # Pulling everything gives every byte back, queues included.
    for topic in list(bus.queues):
        assert bus.pull(topic).result(0) == "x"
    assert bus.held == 0 and not bus.queues
    sub = bus.subscribe("t")
    bus.broadcast("t", "é" * 100)
    assert bus.held > 100
    sub.close()
    assert bus.held == 0
