"""Talking to the outside: the client session, other inferlets, and child inferlets.

Receives return host futures awaited on the Pie event loop, so an inferlet can wait for a
message while its forwards run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from pie.sdk._wit import PieError, call, messaging, poll, runtime, session
from pie.sdk.loop import wait_host


# ---- this instance ----------------------------------------------------------------------------
def args() -> list[str]:
    """The launch arguments."""
    return list(runtime.arguments())


def instance_id() -> int:
    return int(runtime.instance_id())


def version() -> str:
    return str(runtime.version())


def models() -> list[str]:
    return list(runtime.models())


# ---- the client -------------------------------------------------------------------------------
def send(text: str) -> None:
    """Sends text to the client (streamed to its terminal by `pie run`)."""
    call(session.send, text)


def send_blob(data: bytes) -> None:
    call(session.send_blob, bytes(data))


# The host's error text for a receive after the client closed its input (the runtime's
# `session.END_OF_INPUT`; the guest cannot import the runtime, so it is repeated here).
END_OF_INPUT = "end-of-input"


class EndOfInput(EOFError):
    """The client closed its input (stdin of `pie run` reached its end, or a protocol client
    sent `close_input`): no more messages will come. Raised by `receive` and `receive_blob`
    once every message sent before was received; `messages()` ends there instead."""


async def _take_text(future: int) -> str:
    await wait_host(future)
    return str(call(poll.take_text, future))


def _end_of_input(error: PieError) -> bool:
    return str(error).startswith(END_OF_INPUT)


async def receive() -> str:
    """The client's next text message; raises `EndOfInput` once the client has closed its
    input and every message it sent was received."""
    try:
        return await _take_text(int(call(session.receive)))
    except PieError as e:
        if _end_of_input(e):
            raise EndOfInput(str(e)) from None
        raise


async def receive_blob() -> bytes:
    """The client's next blob; raises `EndOfInput` as `receive` does."""
    future = int(call(session.receive_blob))
    await wait_host(future)
    try:
        return bytes(call(poll.take_blob, future))
    except PieError as e:
        if _end_of_input(e):
            raise EndOfInput(str(e)) from None
        raise


async def messages() -> AsyncIterator[str]:
    """The client's text messages, in order, until it closes its input (where `receive`
    would raise `EndOfInput`, the iteration ends): `async for line in messages(): ...`."""
    while True:
        try:
            text = await receive()
        except EndOfInput:
            return
        yield text


# ---- other inferlets -----------------------------------------------------------------------------
def push(topic: str, message: str) -> None:
    """Appends to queue `topic`; one puller receives each message."""
    call(messaging.push, topic, message)


async def pull(topic: str) -> str:
    """The next message of queue `topic`."""
    return await _take_text(int(call(messaging.pull, topic)))


def broadcast(topic: str, message: str) -> None:
    """Sends to every current subscriber of `topic`."""
    call(messaging.broadcast, topic, message)


class Subscription:
    """Messages broadcast on one topic from now on; `close()` when done."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._handle: int | None = int(call(messaging.subscribe, topic))

    async def next(self) -> str:
        if self._handle is None:
            raise RuntimeError(f"subscription to {self.topic!r} is closed")
        return await _take_text(int(call(messaging.next, self._handle)))

    def close(self) -> None:
        if self._handle is not None:
            call(messaging.unsubscribe, self._handle)
            self._handle = None


def subscribe(topic: str) -> Subscription:
    return Subscription(topic)


# ---- children -------------------------------------------------------------------------------------
class Child:
    """A child inferlet; `await child.result()` gives its result (PieError if it failed)."""

    def __init__(self, future: int) -> None:
        self._future: int | None = future

    async def result(self) -> str:
        if self._future is None:
            raise RuntimeError("this child's result was already taken")
        future, self._future = self._future, None
        return await _take_text(future)

    def cancel(self) -> None:
        if self._future is not None:
            call(runtime.cancel, self._future)


def launch(args: Sequence[str] = (), program: str | None = None) -> Child:
    """Starts a child inferlet running `program` (default: this inferlet's own program)."""
    target = runtime.program() if program is None else program
    return Child(int(call(runtime.launch, target, [str(a) for a in args])))
