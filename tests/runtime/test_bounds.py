"""What the host keeps for an instance is bounded: unread sends, warnings, text per call."""

from __future__ import annotations

import logging

import pytest

from pie.runtime.host.state import WARNINGS_LOGGED, InstanceHost
from pie.runtime.limits import InstanceLimits
from pie.runtime.session import QueueSession


def test_a_session_nobody_reads_keeps_only_the_newest_sends() -> None:
    session = QueueSession(keep_bytes=100)
    for i in range(10):
        session.send_text(1, f"{i:02d}" + "x" * 28)  # 30 bytes each
    session.send_blob(1, b"b" * 30)
    assert session.kept_bytes <= 100
    assert session.dropped == 8
    assert [text[:2] for _, text in session.sent] == ["08", "09"]
    assert len(session.blobs) == 1


def test_a_session_with_a_reader_keeps_nothing() -> None:
    got: list[str] = []
    session = QueueSession(on_text=lambda _id, text: got.append(text))
    for _ in range(1000):
        session.send_text(1, "y" * 1000)
    assert len(got) == 1000 and not session.sent and session.kept_bytes == 0


def test_warnings_about_one_instance_are_counted_past_a_few(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = InstanceHost(
        id=7,
        program="p",
        args=[],
        services=None,
        control=None,
        limits=InstanceLimits(),  # type: ignore[arg-type]
    )
    caplog.set_level(logging.WARNING, logger="pie.inferlet")
    for i in range(805):
        host.warn("a discarded forward pass failed: %d", i)
    host.end_warnings()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == WARNINGS_LOGGED + 2
    assert lines[-1] == f"{805 - WARNINGS_LOGGED} more warnings not logged"
