"""Host side of the `messaging` interface, over the control process's `MessageBus`."""

from __future__ import annotations

from pie.runtime.errors import HostError
from pie.runtime.host import futures
from pie.runtime.host.state import InstanceHost

SUBSCRIPTION = "subscription"
MAX_TOPIC = 256


def _topic(topic: str) -> str:
    if not topic or len(topic) > MAX_TOPIC:
        raise HostError(f"topics are 1 to {MAX_TOPIC} characters, got {len(topic)}")
    return topic


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8 (what crossed from the guest), without encoding ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _message(host: InstanceHost, message: str) -> str:
    size = utf8_size(message)
    if size > host.limits.max_message_bytes:
        raise HostError(f"message of {size} bytes; the limit is {host.limits.max_message_bytes}")
    return message


def push(host: InstanceHost, topic: str, message: str) -> None:
    host.control.push(_topic(topic), _message(host, message))


def pull(host: InstanceHost, topic: str) -> int:
    return futures.add(host, "text", host.control.pull(_topic(topic)))


def broadcast(host: InstanceHost, topic: str, message: str) -> None:
    host.control.broadcast(_topic(topic), _message(host, message))


def subscribe(host: InstanceHost, topic: str) -> int:
    checked = _topic(topic)
    handle = host.handles.add(SUBSCRIPTION, None)
    try:
        host.control.subscribe(handle, checked)
    except BaseException:
        host.handles.pop(SUBSCRIPTION, handle)
        raise
    return handle


def next_message(host: InstanceHost, handle: int) -> int:
    host.handles.get(SUBSCRIPTION, handle)
    return futures.add(host, "text", host.control.next_message(handle))


def unsubscribe(host: InstanceHost, handle: int) -> None:
    host.handles.pop(SUBSCRIPTION, handle)
    host.control.unsubscribe(handle)
