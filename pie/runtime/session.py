"""Client sessions: where an instance's `session.send` goes and its `receive` comes from.

`QueueSession` is the in-process one (tests, `pie run`, the server wraps its connection the
same way): sends go to callbacks, or with none are kept for the caller to read (the newest
`keep_bytes` of them: a program sending in a loop to nobody must not grow the host); the
client side feeds text and blobs in.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


# What a receive fails with once the client has closed its input and every value sent before
# was taken. The text crosses processes and the WIT as an `err` string; the SDK recognizes it
# by this prefix (`pie.sdk.io.END_OF_INPUT`) and raises `EndOfInput`.
END_OF_INPUT = "end-of-input"


class InputClosed(Exception):
    """The client has closed its input: no more messages will come."""

    def __init__(self) -> None:
        super().__init__(f"{END_OF_INPUT}: the client closed its input; no more messages will come")


class Inbox(Generic[T]):
    """Values from the client, handed to receivers in order (thread-safe; this session's and
    the server's `InstanceChannel`'s). A receiver cancelled by its instance leaves at once (a
    loop of receive and discard must not grow the session). Once closed (the client's end of
    input), the values in it are still handed out, then receives fail with `InputClosed` (the
    SDK's `EndOfInput`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: deque[T] = deque()
        self._waiters: deque[cf.Future[T]] = deque()
        self.closed = False

    def put(self, value: T) -> None:
        with self._lock:
            if self.closed:
                raise InputClosed()
            while self._waiters:
                waiter = self._waiters.popleft()
                if waiter.set_running_or_notify_cancel():
                    waiter.set_result(value)
                    return
            self._values.append(value)

    def get(self) -> cf.Future[T]:
        future: cf.Future[T] = cf.Future()
        with self._lock:
            if self._values:
                future.set_result(self._values.popleft())
                return future
            if self.closed:
                future.set_exception(InputClosed())
                return future
            self._waiters.append(future)
        future.add_done_callback(self._withdraw)
        return future

    @property
    def waiting(self) -> int:
        """Receivers waiting for a value now."""
        with self._lock:
            return len(self._waiters)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:  # outside the lock: their callbacks may withdraw others
            if waiter.set_running_or_notify_cancel():
                waiter.set_exception(InputClosed())

    def _withdraw(self, future: cf.Future[T]) -> None:
        if future.cancelled():  # the instance stopped waiting: forget the waiter
            with self._lock:
                if future in self._waiters:
                    self._waiters.remove(future)


KEEP_BYTES = 16 * 2**20  # unread sends a session without callbacks keeps, newest first


class QueueSession:
    """A client session in-process; thread-safe.

    Sends with no callback to take them are kept in `sent` / `blobs` up to `keep_bytes` in
    all; past that the oldest go (`dropped` counts them), as the server's backlog for a
    detached client does.
    """

    def __init__(
        self,
        on_text: Callable[[int, str], Any] | None = None,
        on_blob: Callable[[int, bytes], Any] | None = None,
        on_first_receive: Callable[[], Any] | None = None,
        on_output: Callable[[int, str, str], Any] | None = None,
        keep_bytes: int = KEEP_BYTES,
    ) -> None:
        self._lock = threading.Lock()
        self._on_text = on_text
        self._on_blob = on_blob
        self._on_first_receive = on_first_receive
        self._on_output = on_output
        self.keep_bytes = keep_bytes
        self.sent: deque[tuple[int, str]] = deque()
        self.blobs: deque[tuple[int, bytes]] = deque()
        self.kept_bytes = 0
        self.dropped = 0
        self._texts: Inbox[str] = Inbox()
        self._blob_inbox: Inbox[bytes] = Inbox()

    # ---- the instance's side ------------------------------------------------------------------
    def send_text(self, instance_id: int, text: str) -> None:
        if self._on_text is not None:
            self._on_text(instance_id, text)
            return
        with self._lock:
            self.sent.append((instance_id, text))
            self._kept(len(text))

    def send_blob(self, instance_id: int, data: bytes) -> None:
        if self._on_blob is not None:
            self._on_blob(instance_id, data)
            return
        with self._lock:
            self.blobs.append((instance_id, data))
            self._kept(len(data))

    def _kept(self, size: int) -> None:
        """Counts a kept send; drops the oldest while past the budget (lock held)."""
        self.kept_bytes += size
        while self.kept_bytes > self.keep_bytes and (self.sent or self.blobs):
            queue: deque[Any] = self.sent if self.sent else self.blobs
            instance_id, item = queue.popleft()
            self.kept_bytes -= len(item)
            self.dropped += 1
            if self.dropped == 1:
                log.warning(
                    "instance %d sends to a session nobody reads: keeping its newest %d bytes",
                    instance_id,
                    self.keep_bytes,
                )

    def output(self, instance_id: int, stream: str, text: str) -> None:
        """A guest's stdout/stderr line: to `on_output`, else the log (`pie.inferlet.<id>`)."""
        if self._on_output is not None:
            self._on_output(instance_id, stream, text)
        else:
            logging.getLogger(f"pie.inferlet.{instance_id}").info("[%s] %s", stream, text)

    def receive_text(self, instance_id: int) -> cf.Future[str]:
        self._first_receive()
        return self._texts.get()

    def receive_blob(self, instance_id: int) -> cf.Future[bytes]:
        self._first_receive()
        return self._blob_inbox.get()

    def _first_receive(self) -> None:
        hook, self._on_first_receive = self._on_first_receive, None
        if hook is not None:
            hook()

    # ---- the client's side --------------------------------------------------------------------
    def put_text(self, text: str) -> None:
        self._texts.put(text)

    def put_blob(self, data: bytes) -> None:
        self._blob_inbox.put(data)

    def close_input(self) -> None:
        """End of input (stdin reached its end): once the texts and blobs already put are
        taken, the instance's receives fail with `InputClosed` (the SDK's `EndOfInput`).
        Putting more afterwards raises `InputClosed`; closing twice is harmless."""
        self._texts.close()
        self._blob_inbox.close()

    def text_of(self, instance_id: int) -> str:
        """What instance `instance_id` sent and the session kept, concatenated."""
        with self._lock:
            return "".join(t for i, t in self.sent if i == instance_id)
