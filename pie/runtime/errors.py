"""Typed errors of the runtime: building, launching and running inferlets.

`HostError` is what a host call reports to the guest as a WIT `result` error (the guest can
handle it); `InstanceTrap` ends the calling instance (a limit, a cancel); the rest reach the
server or the command line.
"""

from __future__ import annotations

from pie.control.errors import ControlError
from pie.engine.errors import EngineError


class InferletError(Exception):
    """Base class of the runtime's errors."""


class HostError(InferletError):
    """A host call the guest made wrongly or that cannot be served now; returned as `err`."""


class InstanceTrap(InferletError):
    """Ends the calling instance at once (limit reached, cancelled); becomes a wasm trap."""


class BuildError(InferletError):
    """An inferlet failed to build; `location` is `file:line` in the user's source when known."""

    def __init__(self, message: str, location: str | None = None) -> None:
        super().__init__(f"{location}: {message}" if location else message)
        self.location = location


class LaunchError(InferletError):
    """An inferlet could not be started (unknown program, bad component, too many instances)."""


class InstanceFailed(InferletError):
    """An inferlet ended with an error (its own, a trap or a limit); the message says which."""


# What a host call may raise that the guest can handle: returned as a WIT `err`, never a trap.
GUEST_ERRORS: tuple[type[Exception], ...] = (HostError, ControlError, EngineError)


def last_line(error: BaseException) -> str:
    """What went wrong, in one line: a guest's traceback ends with its exception."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__
