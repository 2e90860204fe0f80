"""A worker's messages to the control process, sent as one frame per turn of its instances.

When an engine step's answers reach a worker, every instance they wake runs its guest until it
blocks again (its next forward submitted) or ends. Their operations gather here and leave as
one frame once none of the woken instances is still running, so the forwards one step made
possible travel together and the control process wakes once per worker per step, not once per
instance. An instance that blocks while others still run gives them `gap_s` before it sends
what waits itself; an operation whose reply its caller needs goes out at once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pie.runtime.workers.channel import Channel
from pie.runtime.workers.frame_queue import FrameQueue

GAP_SECONDS = 0.002


class Outbox:
    """Thread-safe."""

    def __init__(self, channel: Channel, gap_s: float = GAP_SECONDS) -> None:
        self.channel = channel
        self.gap_s = gap_s
        self._queue = FrameQueue(channel)
        self._lock = threading.Lock()  # guards `_awake`
        self._since = 0.0  # when the oldest unsent item was put
        self._awake: set[int] = set()  # instances woken by an answer and not blocked since

    def put(self, message: Any) -> None:
        if self._queue.add(message):
            self._since = time.monotonic()

    def send_now(self, message: Any) -> None:
        self._queue.add(message)
        self._queue.send()

    def woke(self, owner: int) -> None:
        """`owner` is about to be woken by an answer: wait for it before sending."""
        with self._lock:
            self._awake.add(owner)

    def blocking(self, owner: int) -> bool:
        """`owner` is about to block (or end). Sends what waits if no woken instance still
        runs; returns whether something is left unsent (then call `flush` after `gap_s`)."""
        with self._lock:
            self._awake.discard(owner)
            others = bool(self._awake)
        if not others:
            self._queue.send()
            return False
        return bool(self._queue.items)

    def flush(self) -> None:
        with self._lock:
            self._awake.clear()  # whoever still runs sends its own items when it blocks
        self._queue.send()

    def flush_if_stale(self) -> None:
        """For a guest computing without blocking: what waits longer than `gap_s` goes."""
        if self._queue.items and time.monotonic() - self._since > self.gap_s:
            self.flush()
