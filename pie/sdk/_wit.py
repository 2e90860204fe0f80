"""The generated guest bindings, seen by the rest of the SDK through this one module.

Inside a component these are componentize-py's bindings of the `pie:inferlet` world; under
`pie run --native` the runtime installs stand-ins of the same modules that call the host
in-process; imported anywhere else on the host (`help(pie.sdk)`, an editor, the reference
docs), it installs them itself. Every binding raises `componentize_py_types.Err` for a WIT
error; `call` turns it into `PieError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from componentize_py_types import Err, Ok
    from wit_world.imports import forward, http, kv, messaging, model, poll, runtime, session
except ImportError:  # on the host, outside `pie run`: `help()`, editors, the reference docs
    # The same generated bindings, routed to the host as `--native` routes them: importing
    # and reading the SDK works; a host call outside an inferlet says where it can run.
    from pie.runtime.native import install

    install()
    from componentize_py_types import Err, Ok
    from wit_world.imports import forward, http, kv, messaging, model, poll, runtime, session

__all__ = [
    "Err",
    "Ok",
    "PieError",
    "call",
    "forward",
    "http",
    "kv",
    "messaging",
    "model",
    "poll",
    "runtime",
    "session",
]


class PieError(Exception):
    """A host call failed; the message says why and, where it can, what to do."""


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Calls a binding, raising PieError with the host's message for a WIT error."""
    try:
        return fn(*args)
    except Err as e:
        raise PieError(str(e.value)) from None
