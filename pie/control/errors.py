"""Typed errors of the control layer (page pool, exports, contexts, batch scheduler).

Each message says what happened and what the caller can do; the runtime turns them into WIT
`result` errors for the inferlet, so none of them is a trap.
"""

from __future__ import annotations


class ControlError(Exception):
    """Base class for errors the control layer reports to its caller."""


class PoolExhaustedError(ControlError):
    """The KV page pool has fewer free pages than requested; nothing was allocated."""


class QuotaExceededError(ControlError):
    """An owner would hold more pages than its quota allows; nothing was allocated."""


class UnknownPageError(ControlError):
    """A page id is outside the pool or names a free page; nothing was changed."""


class NotOwnerError(ControlError):
    """The caller holds no (or too few) references on a page, or did not make an export."""


class ExportNotFoundError(ControlError):
    """No export has the given name."""


class ExportExistsError(ControlError):
    """An export with the given name already exists; nothing was exported."""


class ContextClosedError(ControlError):
    """The KV context was closed; it can no longer be used."""


class InvalidRequestError(ControlError, ValueError):
    """A request to the control layer is malformed (a range, a shape, an index...)."""


class ForwardCancelledError(ControlError):
    """A forward was cancelled before it ran because its owner was cancelled."""


class SchedulerStoppedError(ControlError):
    """The batch scheduler is stopped (or stopping); the forward will not run."""


class IntegrityError(ControlError, AssertionError):
    """The page pool's bookkeeping is inconsistent: a bug in the control layer."""
