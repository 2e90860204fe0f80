"""A length-prefixed frame stream over one end of a socket pair, with its traffic counted.

`send` never waits on a slow reader: it writes what the socket takes at once (one frame per step
normally fits whole) and leaves any rest to a writer thread, so the engine thread that answers a
worker cannot be held up by that worker. `recv` blocks for the next whole frame.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections import deque

HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30  # a frame past this is a bug (or a corrupt stream): the channel closes


class ChannelClosed(Exception):
    """The other end went away (or the stream is corrupt)."""


class Channel:
    """Thread-safe for senders; one thread receives."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._backlog: deque[memoryview] = deque()  # bytes the writer thread still has to send
        self._wake = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        self._closed = False
        self._buffer = bytearray()
        self.frames_sent = self.frames_received = 0
        self.bytes_sent = self.bytes_received = 0

    # ---- sending ------------------------------------------------------------------------------
    def send(self, payload: bytes) -> None:
        data = memoryview(HEADER.pack(len(payload)) + payload)
        with self._lock:
            if self._closed:
                raise ChannelClosed("the channel is closed")
            self.frames_sent += 1
            self.bytes_sent += len(data)
            if not self._backlog:
                try:
                    sent = self.sock.send(data, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as e:
                    self._closed = True
                    raise ChannelClosed(str(e)) from None
                if sent == len(data):
                    return
                data = data[sent:]
            self._backlog.append(data)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="pie-channel", daemon=True)
                self._writer.start()
            self._wake.notify()

    def _write(self) -> None:
        while True:
            with self._lock:
                self._wake.wait_for(lambda: self._backlog or self._closed)
                if self._closed:
                    return
                data = self._backlog[0]
            try:
                self.sock.sendall(data)  # blocking, outside the lock: senders queue meanwhile
            except OSError:
                with self._lock:
                    self._closed = True
                return
            with self._lock:
                self._backlog.popleft()

    # ---- receiving ----------------------------------------------------------------------------
    def recv(self) -> bytes:
        """The next frame's payload; ChannelClosed at the end of the stream."""
        header = self._read(HEADER.size)
        (size,) = HEADER.unpack(header)
        if size > MAX_FRAME:
            self.close()
            raise ChannelClosed(f"a frame of {size} bytes: the stream is corrupt")
        payload = self._read(size)
        self.frames_received += 1
        self.bytes_received += size + HEADER.size
        return payload

    def _read(self, size: int) -> bytes:
        buffer = self._buffer
        while len(buffer) < size:
            try:
                chunk = self.sock.recv(max(1 << 16, size - len(buffer)))
            except OSError as e:
                raise ChannelClosed(str(e)) from None
            if not chunk:
                raise ChannelClosed("the other end closed the channel")
            buffer += chunk
        data = bytes(buffer[:size])
        del buffer[:size]
        return data

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
