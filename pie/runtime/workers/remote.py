"""The worker side of the line: `RemoteControl`, an instance's `ControlPort` in a worker process,
and `Link`, the numbered requests all its instances wait on.

Operations that reply are numbered; their futures resolve when the control process's `Done`
arrives (`Link.resolve`). Operations without a reply (a send, a context made or closed) are put
in the outbox in order and cost no round trip; forward passes too, their results resolving
their futures later. A reply the caller blocks for is sent at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
from collections.abc import Callable
from typing import Any

from pie.engine.request import SampleResult
from pie.runtime.calls import ForwardCall, GeneratedChunk, GenerateSpec
from pie.runtime.errors import HostError
from pie.runtime.workers import frames
from pie.runtime.workers.outbox import Outbox

Decode = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


def _results(value: Any) -> list[SampleResult]:
    return [frames.result_from_wire(v) for v in value]


class Link:
    """Requests in flight from this worker's instances. Thread-safe."""

    def __init__(self, outbox: Outbox, hosts: dict[int, Any]) -> None:
        self.outbox = outbox
        self.hosts = hosts  # owner -> InstanceHost, to see who waits on what
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # req -> (future, decode, owner, whether the owner blocks on it right away)
        self._pending: dict[int, tuple[cf.Future[Any], Decode, int, bool]] = {}
        self._reqs: dict[cf.Future[Any], int] = {}
        self._closed: str | None = None

    def request(self, owner: int, decode: Decode = _same, sync: bool = False) -> tuple[int, Any]:
        future: cf.Future[Any] = cf.Future()
        req = next(self._ids)
        with self._lock:
            if self._closed is not None:
                raise HostError(self._closed)
            self._pending[req] = (future, decode, owner, sync)
            if not sync:
                self._reqs[future] = req
        return req, future

    def forget(self, future: cf.Future[Any]) -> int | None:
        with self._lock:
            req = self._reqs.pop(future, None)
            if req is not None:
                self._pending.pop(req, None)
            return req

    def resolve(self, dones: list[frames.Done]) -> None:
        """Settles the futures of one frame's answers: first marks every instance they wake
        (so the outbox waits for all of them), then resolves."""
        taken = []
        with self._lock:
            for done in dones:
                entry = self._pending.pop(done.req, None)
                if entry is not None:
                    if not entry[3]:
                        self._reqs.pop(entry[0], None)
                    taken.append((entry, done))
        for (future, _, owner, sync), _ in taken:
            host = self.hosts.get(owner)
            waiting = None if host is None else host.waiting_for
            if sync or (waiting is not None and future in waiting):
                self.outbox.woke(owner)
        for (future, decode, _, _), done in taken:
            if future.cancelled():
                continue
            try:
                if done.ok:
                    future.set_result(decode(done.value))
                else:
                    future.set_exception(HostError(str(done.value)))
            except Exception as e:  # a value that does not decode: the caller sees why
                future.set_exception(HostError(f"bad reply from the control process: {e!r}"))

    def close(self, reason: str) -> None:
        """The control process is gone: every waiter fails with `reason`."""
        with self._lock:
            self._closed = reason
            pending, self._pending = self._pending, {}
            self._reqs.clear()
        for future, _, _, _ in pending.values():
            if not future.done():
                future.set_exception(HostError(reason))


class RemoteControl:
    """`ControlPort` of one instance in a worker process."""

    def __init__(self, link: Link, owner: int) -> None:
        self.link = link
        self.outbox = link.outbox
        self.owner = owner

    def _tell(self, op: str, *args: Any) -> None:
        self.outbox.put(frames.Tell(self.owner, op, list(args)))

    def _call(self, op: str, *args: Any) -> Any:
        req, future = self.link.request(self.owner, sync=True)
        self.outbox.send_now(frames.Call(req, self.owner, op, list(args)))
        self.outbox.blocking(self.owner)
        return future.result()

    def _ask(self, op: str, *args: Any, decode: Decode = _same) -> cf.Future[Any]:
        req, future = self.link.request(self.owner, decode)
        self.outbox.put(frames.Ask(req, self.owner, op, list(args)))
        return future  # type: ignore[no-any-return]

    # ---- kv -----------------------------------------------------------------------------------
    def kv_create(self, ctx: int) -> None:
        self._tell("kv_create", ctx)

    def kv_fork(self, ctx: int, new: int) -> None:
        self._call("kv_fork", ctx, new)

    def kv_length(self, ctx: int) -> int:
        return int(self._call("kv_length", ctx))

    def kv_page_count(self, ctx: int) -> int:
        return int(self._call("kv_page_count", ctx))

    def kv_reserve(self, ctx: int, slots: int) -> None:
        self._call("kv_reserve", ctx, slots)

    def kv_truncate(self, ctx: int, length: int) -> None:
        self._call("kv_truncate", ctx, length)

    def kv_mask(self, ctx: int, start: int, end: int, hidden: bool) -> None:
        self._call("kv_mask", ctx, start, end, hidden)

    def kv_export(self, ctx: int, name: str) -> None:
        self._call("kv_export", ctx, name)

    def kv_import(self, new: int, name: str) -> None:
        self._call("kv_import", new, name)

    def kv_unexport(self, name: str) -> None:
        self._call("kv_unexport", name)

    def kv_exports(self) -> list[str]:
        return [str(n) for n in self._call("kv_exports")]

    def kv_save(self, ctx: int, name: str, ttl_s: int | None) -> None:
        self._call("kv_save", ctx, name, ttl_s)

    def kv_open(self, new: int, name: str) -> None:
        self._call("kv_open", new, name)

    def kv_snapshot_delete(self, name: str) -> None:
        self._call("kv_snapshot_delete", name)

    def kv_snapshots(self) -> list[str]:
        return [str(n) for n in self._call("kv_snapshots")]

    def kv_close(self, ctx: int) -> None:
        self._tell("kv_close", ctx)

    # ---- forward passes -----------------------------------------------------------------------
    def submit(self, passes: list[tuple[int, ForwardCall]]) -> list[cf.Future[list[SampleResult]]]:
        futures = []
        wire = []
        for ctx, call in passes:
            req, future = self.link.request(self.owner, _results)
            futures.append(future)
            wire.append(frames.call_to_wire(req, ctx, call))
        self.outbox.put(frames.Submit(self.owner, wire))
        return futures

    def generate_many(self, runs: list[tuple[int, int, GenerateSpec]]) -> None:
        wire = [[gen, ctx, frames.spec_to_wire(spec)] for gen, ctx, spec in runs]
        self._tell("generate_many", wire)

    def generate_next(self, gen: int) -> cf.Future[GeneratedChunk]:
        return self._ask("generate_next", gen, decode=frames.chunk_from_wire)

    def generate_stop(self, gen: int) -> None:
        self._tell("generate_stop", gen)

    # ---- grammars (the matcher lives in the control process) -------------------------------------
    def grammar_constrain(self, ctx: int, grammar: str, start: int) -> None:
        self._call("grammar_constrain", ctx, grammar, start)

    def grammar_release_constraint(self, ctx: int) -> bool:
        return bool(self._call("grammar_release_constraint", ctx))

    def grammar_state(self, ctx: int) -> list[Any] | None:
        state = self._call("grammar_state", ctx)
        return None if state is None else list(state)

    # ---- the client session -------------------------------------------------------------------
    def send_text(self, text: str) -> None:
        self._tell("send_text", text)

    def send_blob(self, data: bytes) -> None:
        self._tell("send_blob", data)

    def output(self, stream: str, line: str) -> None:
        self._tell("output", stream, line)

    def receive_text(self) -> cf.Future[str]:
        return self._ask("receive_text")

    def receive_blob(self) -> cf.Future[bytes]:
        return self._ask("receive_blob", decode=bytes)

    # ---- messaging ----------------------------------------------------------------------------
    def push(self, topic: str, message: str) -> None:
        self._call("push", topic, message)

    def broadcast(self, topic: str, message: str) -> None:
        self._call("broadcast", topic, message)

    def pull(self, topic: str) -> cf.Future[str]:
        return self._ask("pull", topic)

    def subscribe(self, sub: int, topic: str) -> None:
        self._tell("subscribe", sub, topic)

    def next_message(self, sub: int) -> cf.Future[str]:
        return self._ask("next_message", sub)

    def unsubscribe(self, sub: int) -> None:
        self._tell("unsubscribe", sub)

    # ---- children -----------------------------------------------------------------------------
    def launch_child(self, program: str, args: list[str]) -> tuple[int, cf.Future[str]]:
        result_req, result = self.link.request(self.owner)
        try:
            child = int(self._call("launch_child", program, args, result_req))
        except BaseException:
            self.link.forget(result)
            raise
        return child, result

    def cancel_child(self, child: int, reason: str) -> None:
        self._call("cancel_child", child, reason)

    def withdraw(self, future: cf.Future[Any]) -> None:
        req = self.link.forget(future)
        future.cancel()
        if req is not None:
            self.outbox.put(frames.Withdraw(req))
