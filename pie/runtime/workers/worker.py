"""A worker process: runs inferlet instances for the control process that started it.

`python -m pie.runtime.workers.worker FD`: FD is this end of a socket pair. The first frame is
the `Setup` (the model's sizes and tokenizer, where compiled components are cached); then the
control process adds programs, launches and cancels instances, and answers their operations.
Each instance runs on its own thread in this process's `Sandbox`; the host side of its WIT
calls runs here too (tokenizing included), so host work spreads over the workers instead of
queueing on one interpreter lock. The control process's end closing ends the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import resource
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from pie.runtime import wasm_calls
from pie.runtime.errors import InstanceFailed
from pie.runtime.host import mcp
from pie.runtime.host.state import HostModel, HostServices, InstanceHost
from pie.runtime.instance import InferletInstance, Program
from pie.runtime.limits import InstanceLimits
from pie.runtime.sandbox import Sandbox
from pie.runtime.workers import frames
from pie.runtime.workers.channel import Channel, ChannelClosed
from pie.runtime.workers.outbox import Outbox
from pie.runtime.workers.remote import Link, RemoteControl

log = logging.getLogger("pie.worker")


class Setup(msgspec.Struct, frozen=True):
    """The first frame a worker receives."""

    protocol: int
    index: int
    cache_root: str
    preopen_dirs: dict[str, str]
    model: tuple[str, int, int, int]  # name, vocab size, page size, max position
    tokenizer: bytes  # pickled: built once here, not per call
    version: str
    gap_s: float
    log_level: int


class Worker:
    def __init__(self, channel: Channel, setup: Setup) -> None:
        self.channel = channel
        self.index = setup.index
        self.sandbox = Sandbox(Path(setup.cache_root), setup.preopen_dirs)
        name, vocab, page_size, max_position = setup.model
        model = HostModel(name, vocab, page_size, max_position, pickle.loads(setup.tokenizer))
        self.services = HostServices(model, setup.version)
        self.outbox = Outbox(channel, setup.gap_s)
        self.hosts: dict[int, InstanceHost] = {}
        self.instances: dict[int, InferletInstance] = {}
        self.link = Link(self.outbox, self.hosts)
        self.programs: dict[str, Program] = {}
        self._lock = threading.Lock()

    # ---- the receive loop (the process's main thread) ---------------------------------------------
    def serve(self) -> None:
        while True:
            try:
                messages = frames.TO_WORKER.decode(self.channel.recv())
            except ChannelClosed:
                break
            dones = [m for m in messages if isinstance(m, frames.Done)]
            if dones:
                self.link.resolve(dones)
            for message in messages:
                if isinstance(message, frames.Done):
                    continue
                if isinstance(message, frames.Shutdown):
                    self._stop_all("the server is shutting down")
                    return
                try:
                    self._handle(message)
                except Exception:  # a bug here must not end the other instances
                    log.exception("worker %d: handling %r failed", self.index, message)
        self.link.close("the control process went away")
        self._stop_all("the control process went away")

    def _handle(self, message: Any) -> None:
        if isinstance(message, frames.Launch):
            self._launch(message)
        elif isinstance(message, frames.Cancel):
            host = self.hosts.get(message.owner)
            if host is not None:
                host.stop(message.reason)
        elif isinstance(message, frames.AddProgram):
            component = self.sandbox.components.load_file(message.hash, Path(message.path))
            self.programs[message.hash] = Program(message.hash, message.name, component)
        elif isinstance(message, frames.CountersPlease):
            self.outbox.send_now(frames.Counters(self.counters()))

    def _launch(self, message: frames.Launch) -> None:
        program = self.programs.get(message.program)
        if program is None:
            self.outbox.send_now(
                frames.Ended(
                    message.owner, False, f"worker {self.index} has no program {message.program}"
                )
            )
            return
        host = InstanceHost(
            id=message.owner,
            program=program.hash,
            args=list(message.args),
            services=self.services,
            control=RemoteControl(self.link, message.owner),
            limits=InstanceLimits(**message.limits),
            gate=self.outbox,
        )
        instance = InferletInstance(self.sandbox, program, host, native=False, on_end=self._ended)
        with self._lock:
            self.hosts[message.owner] = host
            self.instances[message.owner] = instance
        instance.start()

    def _ended(self, instance: InferletInstance, outcome: str | InstanceFailed) -> None:
        with self._lock:
            self.hosts.pop(instance.id, None)
            self.instances.pop(instance.id, None)
        ok = isinstance(outcome, str)
        self.outbox.blocking(instance.id)
        with contextlib.suppress(ChannelClosed):  # the control process gone: nobody waits
            self.outbox.send_now(frames.Ended(instance.id, ok, str(outcome)))

    def _stop_all(self, reason: str) -> None:
        with self._lock:
            instances = list(self.instances.values())
        for instance in instances:
            instance.cancel(reason)
        deadline = time.monotonic() + 2.0
        while any(not i.ended for i in instances) and time.monotonic() < deadline:
            time.sleep(0.01)
        mcp.close_all()  # this process's MCP sessions (os._exit below skips atexit)
        self.sandbox.close()

    def counters(self) -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "host_calls": float(wasm_calls.CALLS[0]),
            "frames_sent": float(self.channel.frames_sent),
            "frames_received": float(self.channel.frames_received),
            "bytes_sent": float(self.channel.bytes_sent),
            "bytes_received": float(self.channel.bytes_received),
            "voluntary_switches": float(usage.ru_nvcsw),
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
        }


def main() -> None:
    # A worker lives as long as its channel: the control process drains on SIGINT/SIGTERM and
    # then says Shutdown (or dies, closing the channel). Signals sent to the whole process group
    # (Ctrl-C in a terminal, `kill -- -PGID`) must not end instances before that drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd = int(sys.argv[1])
    channel = Channel(socket.socket(fileno=fd))
    try:
        setup = msgspec.msgpack.decode(channel.recv(), type=Setup)
    except ChannelClosed:
        return
    logging.basicConfig(
        level=setup.log_level, format=f"%(asctime)s worker-{setup.index} %(name)s %(message)s"
    )
    if setup.protocol != frames.PROTOCOL:
        log.error("protocol %d, this worker speaks %d", setup.protocol, frames.PROTOCOL)
        return
    Worker(channel, setup).serve()
    channel.close()
    os._exit(0)  # threads of guests that ignored their cancel must not hold the exit


if __name__ == "__main__":
    main()
