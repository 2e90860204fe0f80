"""Host futures: the one kind of pending value the guest waits on (`poll` interface).

A forward pass, a child inferlet, a session receive and a message pull all yield a
`HostFuture` in the instance's handle table; `wait-any` waits on any of them.
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass
from typing import Any

from pie.runtime.errors import HostError
from pie.runtime.host.state import InstanceHost

KIND = "future"


@dataclass(slots=True)
class HostFuture:
    """A pending host value: `what` is forward | text | blob | child."""

    what: str
    future: cf.Future[Any]
    # For a child: the handle to cancel it; for a forward: its context (for logging).
    owner_object: Any = None


def add(host: InstanceHost, what: str, future: cf.Future[Any], owner_object: Any = None) -> int:
    return host.handles.add(KIND, HostFuture(what, future, owner_object))


def take(host: InstanceHost, handle: int, *whats: str) -> Any:
    """The value of a ready future of one of `whats` kinds; frees the handle.

    A failed future raises HostError with its message (the guest sees an `err`).
    """
    entry = host.handles.get(KIND, handle)
    if entry.what not in whats:
        raise HostError(f"future {handle} is a {entry.what} future; use its own getter")
    if not entry.future.done():
        raise HostError(f"future {handle} is not ready yet: wait for it with poll.wait-any first")
    host.handles.pop(KIND, handle)
    if entry.future.cancelled():
        raise HostError(f"{entry.what} future {handle} was cancelled")
    error = entry.future.exception()
    if error is not None:
        raise HostError(str(error) or type(error).__name__)
    return entry.future.result()
