"""Host side of the `session` interface: text and blobs to and from the launching client,
which lives in the control process (the instance's port carries them)."""

from __future__ import annotations

from pie.runtime.errors import HostError
from pie.runtime.host import futures
from pie.runtime.host.messaging import utf8_size
from pie.runtime.host.state import InstanceHost


def _check_size(host: InstanceHost, size: int, what: str) -> None:
    if size > host.limits.max_message_bytes:
        raise HostError(f"{what} of {size} bytes; the limit is {host.limits.max_message_bytes}")


def send(host: InstanceHost, text: str) -> None:
    _check_size(host, utf8_size(text), "message")
    host.control.send_text(text)


def send_blob(host: InstanceHost, data: bytes) -> None:
    _check_size(host, len(data), "blob")
    host.control.send_blob(bytes(data))


def receive(host: InstanceHost) -> int:
    return futures.add(host, "text", host.control.receive_text())


def receive_blob(host: InstanceHost) -> int:
    return futures.add(host, "blob", host.control.receive_blob())
