"""Client sessions: where an instance's `session.send` goes and its `receive` comes from.

`QueueSession` is the in-process one (tests, `pie run`, the server wraps its connection the
same way): sends go to callbacks and are recorded; the client side feeds text and blobs in.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Inbox(Generic[T]):
    """Values from the client, handed to receivers in order; a receiver cancelled by its
    instance leaves at once (a loop of receive and discard must not grow the session)."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock  # the session's, held by the callers of put and get
        self.values: deque[T] = deque()
        self.waiters: deque[cf.Future[T]] = deque()

    def put(self, value: T) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if waiter.set_running_or_notify_cancel():
                waiter.set_result(value)
                return
        self.values.append(value)

    def get(self) -> cf.Future[T]:
        future: cf.Future[T] = cf.Future()
        if self.values:
            future.set_result(self.values.popleft())
        else:
            self.waiters.append(future)
            future.add_done_callback(self._withdraw)
        return future

    def _withdraw(self, future: cf.Future[T]) -> None:
        if future.cancelled():  # never under `lock`: put skips cancelled waiters unwoken
            with self.lock:
                if future in self.waiters:
                    self.waiters.remove(future)


class QueueSession:
    """A client session in-process; thread-safe."""

    def __init__(
        self,
        on_text: Callable[[int, str], Any] | None = None,
        on_blob: Callable[[int, bytes], Any] | None = None,
        on_first_receive: Callable[[], Any] | None = None,
        on_output: Callable[[int, str, str], Any] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._on_text = on_text
        self._on_blob = on_blob
        self._on_first_receive = on_first_receive
        self._on_output = on_output
        self.sent: list[tuple[int, str]] = []
        self.blobs: list[tuple[int, bytes]] = []
        self._texts: _Inbox[str] = _Inbox(self._lock)
        self._blob_inbox: _Inbox[bytes] = _Inbox(self._lock)

    # ---- the instance's side ------------------------------------------------------------------
    def send_text(self, instance_id: int, text: str) -> None:
        with self._lock:
            self.sent.append((instance_id, text))
        if self._on_text is not None:
            self._on_text(instance_id, text)

    def send_blob(self, instance_id: int, data: bytes) -> None:
        with self._lock:
            self.blobs.append((instance_id, data))
        if self._on_blob is not None:
            self._on_blob(instance_id, data)

    def output(self, instance_id: int, stream: str, text: str) -> None:
        """A guest's stdout/stderr line: to `on_output`, else the log (`pie.inferlet.<id>`)."""
        if self._on_output is not None:
            self._on_output(instance_id, stream, text)
        else:
            logging.getLogger(f"pie.inferlet.{instance_id}").info("[%s] %s", stream, text)

    def receive_text(self, instance_id: int) -> cf.Future[str]:
        self._first_receive()
        with self._lock:
            return self._texts.get()

    def receive_blob(self, instance_id: int) -> cf.Future[bytes]:
        self._first_receive()
        with self._lock:
            return self._blob_inbox.get()

    def _first_receive(self) -> None:
        hook, self._on_first_receive = self._on_first_receive, None
        if hook is not None:
            hook()

    # ---- the client's side --------------------------------------------------------------------
    def put_text(self, text: str) -> None:
        with self._lock:
            self._texts.put(text)

    def put_blob(self, data: bytes) -> None:
        with self._lock:
            self._blob_inbox.put(data)

    def text_of(self, instance_id: int) -> str:
        """Everything instance `instance_id` sent, concatenated."""
        with self._lock:
            return "".join(t for i, t in self.sent if i == instance_id)
