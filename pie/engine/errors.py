"""Typed errors raised at the engine boundary.

Every check runs before any state changes, so a rejected batch leaves the KV cache as it was.
"""


class EngineError(Exception):
    """Base class for errors the engine reports to its caller."""


class InvalidBatchError(EngineError, ValueError):
    """A forward batch or sampler request is malformed (bad token, page, position, mask...)."""


class ModelLoadError(EngineError):
    """A model file or folder cannot be loaded (missing, unsupported architecture, bad tensors)."""
