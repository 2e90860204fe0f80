"""`Runtime`: the wasm engine, the control layer and every running inferlet of one server.

It owns one wasmtime Engine (epoch interruption on; a ticker thread advances the epoch), the
component cache, the linker with the host implementation, the page pool, export registry,
context manager and batch scheduler over one model engine, the message bus, and the registry of
programs and instances. Two runtimes in one process are independent (the one module-level
thing is an exit hook that freezes every runtime's epoch before the interpreter finalizes).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import wasmtime

from pie import __version__
from pie.control.context import ContextManager
from pie.control.exports import ExportRegistry
from pie.control.page_pool import PagePool
from pie.runtime.build import build_inferlet, cache_dir, source_hash
from pie.runtime.component_cache import ComponentCache
from pie.runtime.errors import HostError, LaunchError
from pie.runtime.host.state import HostServices, InstanceHost, Session
from pie.runtime.instance import InferletInstance, Program
from pie.runtime.limits import InstanceLimits
from pie.runtime.messaging import MessageBus
from pie.runtime.session import QueueSession
from pie.runtime.wasm_bindings import CHECK_TICKS, TICK_SECONDS, build_linker

log = logging.getLogger(__name__)
_TICKING: weakref.WeakSet[Runtime] = weakref.WeakSet()  # runtimes whose epoch still advances


@atexit.register
def _stop_ticking_at_exit() -> None:
    """Freezes every runtime's epoch before the interpreter finalizes.

    A guest still running then never reaches another deadline: its deadline callback
    (`wasm_bindings.watch_deadline`) could not take the GIL of a finalizing interpreter from
    inside wasmtime's frames, and the process would abort instead of exiting.
    """
    runtimes = list(_TICKING)
    for runtime in runtimes:
        runtime._closed.set()
    for runtime in runtimes:
        runtime._ticker.join(timeout=1.0)
    if runtimes:
        time.sleep(CHECK_TICKS * TICK_SECONDS)  # callbacks already due take the GIL meanwhile


# Guest stdout/stderr files are read into the log every 5 ticks (50 ms): a guest past its output
# budget is stopped within about that much more (see instance.GuestLog).
LOG_PUMP_TICKS = 5


class Runtime:
    """Runs inferlets against one model engine. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        engine: Any,
        *,
        limits: InstanceLimits | None = None,
        cache: Path | None = None,
        max_batch_tokens: int = 512,
        max_instances: int = 256,
        preopen_dirs: dict[str, str] | None = None,
        scheduler: Any = None,
    ) -> None:
        from pie.control.scheduler import BatchScheduler

        self.engine = engine
        self.limits = limits or InstanceLimits()
        self.max_instances = max_instances
        # Host directories guests may read and write (none by default: no filesystem).
        self.preopen_dirs = dict(preopen_dirs or {})
        self.pool = PagePool(engine.num_pages)
        self.exports = ExportRegistry(self.pool)
        self.scheduler = scheduler or BatchScheduler(engine, max_batch_tokens=max_batch_tokens)
        self.contexts = ContextManager(self.pool, self.exports, self.scheduler)
        self.scheduler.start()
        self.bus = MessageBus()
        self.services = HostServices(
            engine=engine,
            pool=self.pool,
            exports=self.exports,
            contexts=self.contexts,
            scheduler=self.scheduler,
            bus=self.bus,
            launch=self._launch_child,
            version=__version__,
        )
        config = wasmtime.Config()
        config.epoch_interruption = True
        self.wasm_engine = wasmtime.Engine(config)
        root = cache if cache is not None else cache_dir()
        self.components = ComponentCache(self.wasm_engine, "epoch", root / "compiled")
        self._linker: Any = None
        self._programs: dict[str, Program] = {}
        self._names: dict[str, str] = {}
        self._instances: dict[int, InferletInstance] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._log_dir = Path(tempfile.mkdtemp(prefix="pie-guest-logs-"))
        self._closed = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="pie-epoch", daemon=True)
        self._ticker.start()
        _TICKING.add(self)

    # ---- programs --------------------------------------------------------------------------------
    @property
    def linker(self) -> Any:
        with self._lock:
            if self._linker is None:
                self._linker = build_linker(self.wasm_engine)
            return self._linker

    def add_component(self, wasm: bytes | str | os.PathLike[str], name: str | None = None) -> str:
        """Registers a built component; returns its content hash (also usable as its name)."""
        data = wasm if isinstance(wasm, bytes) else Path(wasm).read_bytes()
        digest, component = self.components.load(data)
        label = name or (Path(wasm).stem if not isinstance(wasm, bytes) else digest[:12])
        self._register(Program(digest, label, component=component), name)
        return digest

    def add_source(
        self, source: str | os.PathLike[str], name: str | None = None, *, native: bool = False
    ) -> str:
        """Registers a Python inferlet: built into a component (cached), or as source only for
        native mode. Returns the program hash."""
        path = Path(source).resolve()
        label = name or path.stem
        if native:
            digest = source_hash(path)
            self._register(Program(digest, label, source=path), name)
            return digest
        digest, component = self.components.load(build_inferlet(path).read_bytes())
        self._register(Program(digest, label, component=component, source=path), name)
        return digest

    def _register(self, program: Program, name: str | None) -> None:
        with self._lock:
            self._programs[program.hash] = program
            self._names[name or program.name] = program.hash

    def program(self, ref: str) -> Program:
        with self._lock:
            digest = self._names.get(ref, ref)
            found = self._programs.get(digest)
        if found is None:
            raise LaunchError(f"unknown program {ref!r}: register it (pie build / upload) first")
        return found

    # ---- instances -------------------------------------------------------------------------------
    def launch(
        self,
        program: str,
        args: Sequence[str] = (),
        *,
        session: Session | None = None,
        limits: InstanceLimits | None = None,
        native: bool = False,
        depth: int = 0,
    ) -> InferletInstance:
        """Starts an instance of `program` (hash or name) and returns it at once."""
        if self._closed.is_set():
            raise LaunchError("the runtime is closed")
        prog = self.program(program)
        with self._lock:
            self._instances = {i: x for i, x in self._instances.items() if x.running}
            if len(self._instances) >= self.max_instances:
                raise LaunchError(
                    f"{self.max_instances} inferlets are running; wait for some to finish"
                )
            instance = InferletInstance(
                self,
                prog,
                list(args),
                instance_id=next(self._ids),
                services=self.services,
                session=session or QueueSession(),
                limits=limits or self.limits,
                native=native,
                depth=depth,
                log_dir=self._log_dir,
            )
            self._instances[instance.id] = instance
        return instance.start()

    def run(self, program: str, args: Sequence[str] = (), **kwargs: Any) -> str:
        """Launches and waits; returns the result or raises InstanceFailed."""
        return self.launch(program, args, **kwargs).wait()

    def _launch_child(
        self, parent: InstanceHost, program: str, args: list[str]
    ) -> InferletInstance:
        try:
            prog = self.program(program)
            parent_instance = self.instance(parent.id)
            # A native parent runs its children natively when it can: one debugger sees them all.
            native = bool(parent_instance and parent_instance.native and prog.source is not None)
            return self.launch(
                prog.hash,
                args,
                session=parent.session,
                limits=parent.limits,
                native=native,
                depth=parent.depth + 1,
            )
        except LaunchError as e:  # the parent can handle it: an err, not a trap
            raise HostError(str(e)) from None

    def instance(self, instance_id: int) -> InferletInstance | None:
        with self._lock:
            return self._instances.get(instance_id)

    def instances(self) -> list[InferletInstance]:
        with self._lock:
            return [x for x in self._instances.values() if x.running]

    # ---- lifecycle -------------------------------------------------------------------------------
    def _tick(self) -> None:
        for count in itertools.count(1):
            if self._closed.wait(TICK_SECONDS):
                return
            self.wasm_engine.increment_epoch()
            if count % LOG_PUMP_TICKS == 0:
                for instance in self.instances():
                    for guest_log in instance.logs:
                        guest_log.pump()

    def close(self, timeout: float = 5.0) -> None:
        """Stops every instance, waits for them (up to `timeout`), stops the scheduler."""
        if self._closed.is_set():
            return
        running = self.instances()
        for instance in running:
            instance.cancel("the runtime is shutting down")
        for instance in running:
            try:
                instance.done.exception(timeout)  # waits; failures are expected here
            except TimeoutError:
                log.warning("instance %d did not stop within %.1f s", instance.id, timeout)
        self._closed.set()
        self.scheduler.stop()
        shutil.rmtree(self._log_dir, ignore_errors=True)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
