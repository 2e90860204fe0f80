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
import itertools
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import wasmtime

from pie.runtime.component_cache import ComponentCache
from pie.runtime.wasm_bindings import CHECK_TICKS, TICK_SECONDS, build_linker

if TYPE_CHECKING:
    from pie.runtime.instance import InferletInstance

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
        shutil.rmtree(self.log_dir, ignore_errors=True)
