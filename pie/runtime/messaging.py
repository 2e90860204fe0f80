"""The message bus between inferlets of one runtime: queues (push/pull, each message to one
puller) and topics (broadcast/subscribe, each message to every subscriber).

Waiters are `concurrent.futures.Future`s, so a pull is a host future like a forward; a waiter
cancelled by its instance (discard, or the instance ended) leaves its queue at once, and a topic
with nothing queued, waiting or subscribed is forgotten: no sequence of calls grows the bus.
Unread messages count against one byte budget for the whole bus (queued messages outlive their
sender, as a mailbox's do), so a flood gets an error instead of the host's memory. The budget
counts what the host holds: a message's size in memory (a str of 4-byte characters costs 4
bytes each), and each queue's own cost, so a spread of one-message topics is bounded too.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
from collections import deque

from pie.runtime.errors import HostError

MAX_QUEUED = 65536  # messages waiting in one queue or one subscription
MAX_BYTES = 256 * 2**20  # unread messages held by the whole bus, in bytes of host memory
# What one more queue costs the host beyond its messages (its deque, the name, the dict entry):
# measured 850 bytes with tracemalloc, rounded up.
QUEUE_BYTES = 1024


def cost(message: str) -> int:
    """Bytes `message` takes in the host's memory (a str stores 1, 2 or 4 bytes a character)."""
    return sys.getsizeof(message)


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
                future.set_result(self.bus.take(self.inbox))
            else:
                self.waiters.append(future)
                future.add_done_callback(self._withdraw)
        return future

    def _withdraw(self, future: cf.Future[str]) -> None:
        if future.cancelled():
            with self.bus.lock:
                if future in self.waiters:
                    self.waiters.remove(future)

    def close(self) -> None:
        with self.bus.lock:
            if self.closed:
                return
            self.closed = True
            subscribers = self.bus.subscribers.get(self.topic)
            if subscribers is not None:
                subscribers.discard(self)
                if not subscribers:
                    del self.bus.subscribers[self.topic]
            self.bus.held -= sum(cost(m) for m in self.inbox)
            self.inbox.clear()
            waiters, self.waiters = list(self.waiters), deque()
        for waiter in waiters:
            waiter.cancel()


class MessageBus:
    """Thread-safe; one per runtime."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        # Reentrant: cancelling a waiter runs its withdraw callback, which takes the lock too.
        self.lock = threading.RLock()
        self.max_bytes = max_bytes
        self.held = 0  # bytes of unread messages in queues and inboxes
        self.queues: dict[str, deque[str]] = {}
        self.pullers: dict[str, deque[cf.Future[str]]] = {}
        self.subscribers: dict[str, set[Subscription]] = {}

    def push(self, topic: str, message: str) -> None:
        with self.lock:
            pullers = self.pullers.get(topic)
            if pullers is not None:
                delivered = _deliver(pullers, message)
                if not pullers:
                    del self.pullers[topic]
                if delivered:
                    return
            queue = self.queues.get(topic)
            if queue is not None and len(queue) >= MAX_QUEUED:
                raise HostError(f"queue {topic!r} holds {MAX_QUEUED} unread messages; pull first")
            if queue is None:
                self._reserve(cost(message) + QUEUE_BYTES)
                self.queues[topic] = queue = deque()
            else:
                self._reserve(cost(message))
            queue.append(message)

    def pull(self, topic: str) -> cf.Future[str]:
        future: cf.Future[str] = cf.Future()
        with self.lock:
            queue = self.queues.get(topic)
            if queue:
                future.set_result(self.take(queue))
                if not queue:
                    del self.queues[topic]
                    self.held -= QUEUE_BYTES
            else:
                self.pullers.setdefault(topic, deque()).append(future)
                future.add_done_callback(lambda f: self._withdraw(topic, f))
        return future

    def _withdraw(self, topic: str, future: cf.Future[str]) -> None:
        if not future.cancelled():
            return
        with self.lock:
            pullers = self.pullers.get(topic)
            if pullers is not None and future in pullers:
                pullers.remove(future)
                if not pullers:
                    del self.pullers[topic]

    def broadcast(self, topic: str, message: str) -> int:
        """Delivers to every current subscriber; returns how many there were."""
        with self.lock:
            subscribers = list(self.subscribers.get(topic, ()))
            size = cost(message)
            self._reserve(size * len(subscribers))  # refunded for each one waiting
            for sub in subscribers:
                if _deliver(sub.waiters, message):
                    self.held -= size
                    continue
                if len(sub.inbox) >= MAX_QUEUED:
                    self.take(sub.inbox)  # a subscriber that never reads loses the oldest
                sub.inbox.append(message)
            return len(subscribers)

    def subscribe(self, topic: str) -> Subscription:
        sub = Subscription(self, topic)
        with self.lock:
            self.subscribers.setdefault(topic, set()).add(sub)
        return sub

    # ---- the byte budget (lock held) ----------------------------------------------------------
    def _reserve(self, nbytes: int) -> None:
        if self.held + nbytes > self.max_bytes:
            raise HostError(
                f"the message bus holds {self.held} bytes of unread messages (limit "
                f"{self.max_bytes}); the receivers must pull before more can be sent"
            )
        self.held += nbytes

    def take(self, messages: deque[str]) -> str:
        message = messages.popleft()
        self.held -= cost(message)
        return message
