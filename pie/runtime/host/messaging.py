"""Host side of the `messaging` interface, over the runtime's `MessageBus`."""

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


def _message(host: InstanceHost, message: str) -> str:
    if len(message) > host.limits.max_message_bytes:
        raise HostError(
            f"message of {len(message)} bytes; the limit is {host.limits.max_message_bytes}"
        )
    return message


def push(host: InstanceHost, topic: str, message: str) -> None:
    host.services.bus.push(_topic(topic), _message(host, message))


def pull(host: InstanceHost, topic: str) -> int:
    return futures.add(host, "text", host.services.bus.pull(_topic(topic)))


def broadcast(host: InstanceHost, topic: str, message: str) -> None:
    host.services.bus.broadcast(_topic(topic), _message(host, message))


def subscribe(host: InstanceHost, topic: str) -> int:
    subscription = host.services.bus.subscribe(_topic(topic))
    try:
        return host.handles.add(SUBSCRIPTION, subscription)
    except HostError:
        subscription.close()
        raise


def next_message(host: InstanceHost, handle: int) -> int:
    subscription = host.handles.get(SUBSCRIPTION, handle)
    return futures.add(host, "text", subscription.next())


def unsubscribe(host: InstanceHost, handle: int) -> None:
    host.handles.pop(SUBSCRIPTION, handle).close()
