"""The message bus between inferlets of one runtime: queues (push/pull, each message to one
puller) and topics (broadcast/subscribe, each message to every subscriber).

Waiters are `concurrent.futures.Future`s, so a pull is a host future like a forward; a waiter
cancelled by its instance (discard, or the instance ended) is skipped, never handed a message.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections import defaultdict, deque

from pie.runtime.errors import HostError

MAX_QUEUED = 65536  # messages waiting in one queue or one subscription


def _deliver(waiters: deque[cf.Future[str]], message: str) -> bool:
    """Hands `message` to the first live waiter; False if none is waiting."""
    while waiters:
        waiter = waiters.popleft()
        if waiter.set_running_or_notify_cancel():
            waiter.set_result(message)
            return True
    return False


class Subscription:
    """One subscriber's view of a topic: messages broadcast since it subscribed."""

    def __init__(self, bus: MessageBus, topic: str) -> None:
        self.bus = bus
        self.topic = topic
        self.inbox: deque[str] = deque()
        self.waiters: deque[cf.Future[str]] = deque()
        self.closed = False

    def next(self) -> cf.Future[str]:
        future: cf.Future[str] = cf.Future()
        with self.bus.lock:
            if self.inbox:
                future.set_result(self.inbox.popleft())
            else:
                self.waiters.append(future)
        return future

    def close(self) -> None:
        with self.bus.lock:
            self.closed = True
            self.bus.subscribers[self.topic].discard(self)
            for waiter in self.waiters:
                waiter.cancel()
            self.waiters.clear()


class MessageBus:
    """Thread-safe; one per runtime."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: dict[str, deque[str]] = defaultdict(deque)
        self.pullers: dict[str, deque[cf.Future[str]]] = defaultdict(deque)
        self.subscribers: dict[str, set[Subscription]] = defaultdict(set)

    def push(self, topic: str, message: str) -> None:
        with self.lock:
            if _deliver(self.pullers[topic], message):
                return
            if len(self.queues[topic]) >= MAX_QUEUED:
                raise HostError(f"queue {topic!r} holds {MAX_QUEUED} unread messages; pull first")
            self.queues[topic].append(message)

    def pull(self, topic: str) -> cf.Future[str]:
        future: cf.Future[str] = cf.Future()
        with self.lock:
            if self.queues[topic]:
                future.set_result(self.queues[topic].popleft())
            else:
                self.pullers[topic].append(future)
        return future

    def broadcast(self, topic: str, message: str) -> int:
        """Delivers to every current subscriber; returns how many there were."""
        with self.lock:
            subscribers = list(self.subscribers[topic])
            for sub in subscribers:
                if not _deliver(sub.waiters, message):
                    if len(sub.inbox) >= MAX_QUEUED:
                        sub.inbox.popleft()  # a subscriber that never reads loses the oldest
                    sub.inbox.append(message)
            return len(subscribers)

    def subscribe(self, topic: str) -> Subscription:
        sub = Subscription(self, topic)
        with self.lock:
            self.subscribers[topic].add(sub)
        return sub
