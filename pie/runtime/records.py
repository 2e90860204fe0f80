"""`InstanceRecord`: an inferlet instance as the control process knows it, wherever it runs.

`Runtime.launch` returns it. It holds what the control process owns of the instance (its
session, limits, parent and children) and the `done` future, resolved once the instance has
ended and every page it held is back in the pool.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from typing import TYPE_CHECKING, Any

from pie.runtime.limits import InstanceLimits

if TYPE_CHECKING:
    from pie.runtime.instance import InferletInstance, Program
    from pie.runtime.runtime import Runtime


class InstanceRecord:
    def __init__(
        self,
        runtime: Runtime,
        instance_id: int,
        program: Program,
        args: list[str],
        session: Any,
        limits: InstanceLimits,
        *,
        native: bool,
        depth: int,
        parent: InstanceRecord | None,
    ) -> None:
        self.runtime = runtime
        self.id = instance_id
        self.program = program
        self.args = args
        self.session = session
        self.limits = limits
        self.native = native
        self.depth = depth
        self.parent = parent
        self.children: list[InstanceRecord] = []
        self.done: cf.Future[str] = cf.Future()
        self.local: InferletInstance | None = None  # when it runs in this process
        self.worker: int | None = None  # else the index of its worker process
        self.started_at = time.monotonic()
        self.ended_at = 0.0

    def wait(self, timeout: float | None = None) -> str:
        """The result; raises InstanceFailed if the instance failed."""
        return self.done.result(timeout)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stops the instance (wherever it runs); `done` fails with `reason`."""
        if self.done.done():
            return
        if self.local is not None:
            self.local.cancel(reason)
        elif self.runtime.workers is not None:
            self.runtime.workers.cancel(self, reason)

    @property
    def running(self) -> bool:
        return not self.done.done()

    def live_children(self) -> list[InstanceRecord]:
        self.children = [c for c in self.children if c.running]
        return self.children

    def __repr__(self) -> str:
        where = "here" if self.worker is None else f"worker {self.worker}"
        return f"InstanceRecord({self.id}, {self.program.name}, {where}, running={self.running})"
