"""`InstanceChannel`: the runtime `Session` of one instance launched over the client protocol.

The runtime calls it from its own threads (never blocking); it hands every event to the
asyncio loop, where the connection now attached to the instance sends it as a frame, or, with
none attached (detached, or before the launch reply went out), a bounded backlog keeps it.
Client messages come in through `put_text` / `put_blob` and wait in inboxes for `receive`;
`close_input` ends them (the program's `receive` raises `EndOfInput` once they are taken).
`ChannelRegistry` maps instance ids to channels (loop thread only).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pie.runtime.session import Inbox

# What an instance may emit, in the order a client sees it; `return` or `error` comes last.
EVENT_KINDS = ("stdout", "stderr", "message", "blob", "return", "error")


@dataclass(slots=True)
class Event:
    instance: int  # the instance that emitted it (a child shares its parent's channel)
    kind: str  # one of EVENT_KINDS
    text: str | None = None
    data: bytes | None = None
    reason: str | None = None  # error events: "failed" or "cancelled"

    @property
    def size(self) -> int:
        return len(self.text or "") + len(self.data or b"") + 32


Sink = Callable[["InstanceChannel", Event], None]


class InstanceChannel:
    """Session of one launched instance (and its children); see the module docstring."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, program: str, args: list[str], max_backlog: int
    ) -> None:
        self.loop = loop
        self.program = program
        self.args = list(args)
        self.max_backlog = max_backlog
        self.instance_id = 0  # set once launched
        self.handle: Any = None  # the runtime's instance handle
        self.created_at = time.time()
        # Loop-thread state: where events go now.
        self.sink: Sink | None = None
        self.owner: object | None = None  # the connection attached now
        # The id of the frame (launch or attach) that bound the stream.
        self.correlation: int | None = 0
        self.detached = False
        self.held = True  # events wait in the backlog until the launch reply is out
        self.backlog: deque[Event] = deque()
        self.backlog_bytes = 0
        self.dropped = 0  # events dropped from a full backlog
        self.finished_at: float | None = None
        self.cancel_reason: str | None = None  # why the server or client ended it
        self._texts: Inbox[str] = Inbox()
        self._blobs: Inbox[bytes] = Inbox()

    # ---- the runtime's side (any thread, never blocks) ------------------------------------------
    def send_text(self, instance_id: int, text: str) -> None:
        self._post(Event(instance_id, "message", text=text))

    def send_blob(self, instance_id: int, data: bytes) -> None:
        self._post(Event(instance_id, "blob", data=bytes(data)))

    def output(self, instance_id: int, stream: str, text: str) -> None:
        self._post(Event(instance_id, stream if stream in EVENT_KINDS else "stderr", text=text))

    def receive_text(self, instance_id: int) -> cf.Future[str]:
        return self._texts.get()

    def receive_blob(self, instance_id: int) -> cf.Future[bytes]:
        return self._blobs.get()

    def watch(self, handle: Any) -> None:
        """Binds the launched instance; its end becomes the last event."""
        self.handle = handle
        self.instance_id = int(handle.id)
        handle.done.add_done_callback(self._on_done)

    def _on_done(self, done: cf.Future[str]) -> None:
        error = done.exception() if not done.cancelled() else cf.CancelledError("cancelled")
        if error is None:
            event = Event(self.instance_id, "return", text=done.result())
        else:
            reason = "cancelled" if self.cancel_reason is not None else "failed"
            event = Event(self.instance_id, "error", text=str(error), reason=reason)
        self._post(event, last=True)

    def _post(self, event: Event, last: bool = False) -> None:
        # A closed loop means the server is gone: nobody to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._deliver, event, last)

    # ---- the client's side (loop thread) --------------------------------------------------------------
    def put_text(self, text: str) -> None:
        self._texts.put(text)

    def put_blob(self, data: bytes) -> None:
        self._blobs.put(data)

    def close_input(self) -> None:
        """The client sends no more: receives fail with `InputClosed` once the inboxes are
        empty (the program sees `EndOfInput`). Closing twice is harmless."""
        self._texts.close()
        self._blobs.close()

    @property
    def input_closed(self) -> bool:
        return self._texts.closed

    def cancel(self, reason: str) -> None:
        if self.handle is not None and self.finished_at is None:
            self.cancel_reason = self.cancel_reason or reason
            self.handle.cancel(reason)

    def bind(self, owner: object, sink: Sink, correlation: int | None) -> None:
        """Streams events to `sink` from now on, the backlog first."""
        self.owner, self.sink, self.correlation = owner, sink, correlation
        self.detached = False
        self.release()

    def release(self) -> None:
        """Ends the hold after the launch reply: the backlog goes out, then live events."""
        self.held = False
        while self.backlog and self.sink is not None:
            event = self.backlog.popleft()
            self.backlog_bytes -= event.size
            self.sink(self, event)

    def unbind(self) -> None:
        self.owner = self.sink = None

    def _deliver(self, event: Event, last: bool) -> None:
        if last:
            self.finished_at = time.time()
        if self.sink is not None and not self.held:
            self.sink(self, event)
            return
        self.backlog.append(event)
        self.backlog_bytes += event.size
        # Full: drop the oldest output, never the final event.
        while self.backlog_bytes > self.max_backlog and len(self.backlog) > 1:
            dropped = self.backlog.popleft()
            self.backlog_bytes -= dropped.size
            self.dropped += 1

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def summary(self) -> dict[str, Any]:
        return {
            "instance": self.instance_id,
            "program": self.program,
            "args": self.args,
            "running": not self.finished,
            "attached": self.owner is not None,
            "detached": self.detached,
            "created_at": self.created_at,
        }


class ChannelRegistry:
    """Instance id -> channel, for attach, list and cleanup (loop thread only)."""

    def __init__(self) -> None:
        self._channels: dict[int, InstanceChannel] = {}

    def add(self, channel: InstanceChannel) -> None:
        self._channels[channel.instance_id] = channel

    def get(self, instance_id: int) -> InstanceChannel | None:
        return self._channels.get(instance_id)

    def remove(self, instance_id: int) -> None:
        self._channels.pop(instance_id, None)

    def all(self) -> list[InstanceChannel]:
        return list(self._channels.values())

    def expire(self, ttl_s: float, now: float | None = None) -> int:
        """Forgets finished channels nobody attached within `ttl_s`; returns how many."""
        now = time.time() if now is None else now
        old = [
            i
            for i, ch in self._channels.items()
            if ch.finished_at is not None and ch.owner is None and now - ch.finished_at > ttl_s
        ]
        for i in old:
            del self._channels[i]
        return len(old)
