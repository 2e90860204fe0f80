"""The client's errors: what the server refused, how an instance ended, a lost connection."""

from __future__ import annotations


class PieClientError(Exception):
    """Base class of the client's errors."""


class ServerError(PieClientError):
    """The server answered a request with an error frame; `code` says which kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InstanceError(PieClientError):
    """The instance ended with an error; `reason` is "failed" or "cancelled"."""

    def __init__(self, instance: int, message: str, reason: str | None) -> None:
        super().__init__(message)
        self.instance = instance
        self.reason = reason or "failed"


class ConnectionLost(PieClientError):
    """The connection to the server closed before the answer came."""
