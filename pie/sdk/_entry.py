"""The glue between the world's `run` export and the user's `main(args)`.

The same function serves both modes: the component's generated entry module calls it inside
the sandbox, and `pie run --native` calls it on a host thread. Errors come back as `Err` with a
traceback whose frames name the user's real file.
"""

from __future__ import annotations

import gc
import inspect
import json
import traceback
from types import ModuleType

from pie.sdk import _state
from pie.sdk._wit import Err
from pie.sdk.loop import run


def run_inferlet(module: ModuleType, input: str, source: str | None = None) -> str:
    """Runs `module.main(args)` (sync or async) and returns its result as text."""
    main = getattr(module, "main", None)
    if not callable(main):
        raise Err(f"{source or module.__name__}: the inferlet defines no `main(args)` function")
    try:
        args = json.loads(input) if input else []
    except ValueError:
        args = [input]
    _state.reset()
    try:
        result = run(main(args)) if inspect.iscoroutinefunction(main) else main(args)
        if inspect.iscoroutine(result):
            result = run(result)
    except Exception as e:
        raise Err(_format_error(e, module, source)) from None
    return "" if result is None else str(result)


async def _nothing() -> None:
    pass


def warm_up() -> None:
    """Runs the event loop once without a host call, then freezes the heap.

    Called at build time: what asyncio sets up on first use (its policy, the loop's clock and
    code paths) then lives in the component's snapshot instead of costing every launch, and
    `gc.freeze` keeps the collector out of the snapshot's objects, so an instance neither
    walks nor dirties those pages (they stay shared with the image: faster start, less memory).
    """
    run(_nothing())
    gc.collect()
    gc.freeze()


def _format_error(error: Exception, module: ModuleType, source: str | None) -> str:
    text = "".join(traceback.format_exception(error))
    built_as = getattr(module, "__file__", None)
    if source and built_as:
        text = text.replace(built_as, source)
    return text.rstrip()
