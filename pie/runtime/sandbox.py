"""`Sandbox`: the WebAssembly side of one process, where inferlet instances run.

One wasmtime Engine with epoch interruption (a ticker thread advances the epoch and reads the
guests' stdout/stderr files), the compiled components, the linker with the host functions, the
host directories guests may open (none by default), and the instances running here. A worker
process has one; so does the control process, for native runs and for wasm instances when it
runs them itself (`workers=0`). The one module-level thing is an exit hook that freezes every
sandbox's epoch before the interpreter finalizes.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import itertools
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import wasmtime

from pie.runtime.component_cache import ComponentCache
from pie.runtime.wasm_bindings import CHECK_TICKS, TICK_SECONDS, build_linker

if TYPE_CHECKING:
    from pie.runtime.instance import InferletInstance, Program

_TICKING: weakref.WeakSet[Sandbox] = weakref.WeakSet()  # sandboxes whose epoch still advances

# Guest stdout/stderr files are read every 5 ticks (50 ms): a guest past its output budget is
# stopped within about that much more (see instance.GuestLog).
LOG_PUMP_TICKS = 5
CONFIG_KEY = "epoch"  # part of the compiled-component cache key: the engine's configuration


@atexit.register
def _stop_ticking_at_exit() -> None:
    """Freezes every sandbox's epoch before the interpreter finalizes.

    A guest still running then never reaches another deadline: its deadline callback
    (`wasm_bindings.watch_deadline`) could not take the GIL of a finalizing interpreter from
    inside wasmtime's frames, and the process would abort instead of exiting.
    """
    sandboxes = list(_TICKING)
    for sandbox in sandboxes:
        sandbox._closed.set()
    for sandbox in sandboxes:
        sandbox._ticker.join(timeout=1.0)
    if sandboxes:
        time.sleep(CHECK_TICKS * TICK_SECONDS)  # callbacks already due take the GIL meanwhile


@dataclass(frozen=True)
class Prepared:
    """A program instantiated in a fresh store (memory limit and WASI set), not yet run."""

    store: wasmtime.Store
    run: Any  # the `run` export (None if the component has none)
    stdout: Path
    stderr: Path
    memory_bytes: int


class Sandbox:
    """Use `close()` when done (instances must have ended)."""

    def __init__(self, cache_root: Path, preopen_dirs: dict[str, str] | None = None) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        self.wasm_engine = wasmtime.Engine(config)
        self.components = ComponentCache(self.wasm_engine, CONFIG_KEY, cache_root / "compiled")
        # Host directories guests may read and write (none by default: no filesystem).
        self.preopen_dirs = dict(preopen_dirs or {})
        self.log_dir = Path(tempfile.mkdtemp(prefix="pie-guest-logs-"))
        self.running: set[InferletInstance] = set()
        self._linker: Any = None
        self._lock = threading.Lock()
        # One instance of each launched program made ahead, so a launch skips instantiation
        # (~1 ms of it); made on this thread, off the launch path.
        self._ready: dict[str, Prepared] = {}
        self._preparer = cf.ThreadPoolExecutor(1, thread_name_prefix="pie-prepare")
        self._files = itertools.count(1)
        self._closed = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="pie-epoch", daemon=True)
        self._ticker.start()
        _TICKING.add(self)

    @property
    def linker(self) -> Any:
        with self._lock:
            if self._linker is None:
                self._linker = build_linker(self.wasm_engine)
            return self._linker

    # ---- instantiation ------------------------------------------------------------------------------
    def instantiate(self, program: Program, memory_bytes: int) -> Prepared:
        """`program` ready to run: the instance made ahead if it fits, else a new one; then the
        next one is made ahead. Raises WasmtimeError if the component cannot instantiate."""
        with self._lock:
            ready = self._ready.pop(program.hash, None)
        if ready is None or ready.memory_bytes != memory_bytes:
            ready = self._make(program, memory_bytes)
        if not self._closed.is_set():
            self._preparer.submit(self._make_ahead, program, memory_bytes)
        return ready

    def _make(self, program: Program, memory_bytes: int) -> Prepared:
        n = next(self._files)
        stdout, stderr = self.log_dir / f"{n}.stdout", self.log_dir / f"{n}.stderr"
        store = wasmtime.Store(self.wasm_engine)
        store.set_limits(memory_size=memory_bytes)
        wasi = wasmtime.WasiConfig()
        wasi.argv = [program.name]
        wasi.stdout_file = str(stdout)
        wasi.stderr_file = str(stderr)
        for host_path, guest_path in self.preopen_dirs.items():
            wasi.preopen_dir(host_path, guest_path)
        store.set_wasi(wasi)
        # Instantiation runs guest start code: the deadline must not be due (0 traps at once);
        # the instance's own limits take over when it runs.
        store.set_epoch_deadline(1 << 40)
        instance = self.linker.instantiate(store, program.component)
        return Prepared(store, instance.get_func(store, "run"), stdout, stderr, memory_bytes)

    def _make_ahead(self, program: Program, memory_bytes: int) -> None:
        with self._lock:
            if program.hash in self._ready or self._closed.is_set():
                return
        try:
            ready = self._make(program, memory_bytes)
        except wasmtime.WasmtimeError:
            return  # the launch that needs it will instantiate, and report the error
        with self._lock:
            self._ready.setdefault(program.hash, ready)

    def _tick(self) -> None:
        for count in itertools.count(1):
            if self._closed.wait(TICK_SECONDS):
                return
            self.wasm_engine.increment_epoch()
            if count % LOG_PUMP_TICKS == 0:
                for instance in list(self.running):
                    for guest_log in instance.logs:
                        guest_log.pump()

    def close(self) -> None:
        self._closed.set()
        self._preparer.shutdown(wait=True)
        with self._lock:
            self._ready.clear()
        shutil.rmtree(self.log_dir, ignore_errors=True)
