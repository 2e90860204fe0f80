"""The host-call trampoline: one ctypes callback serves every `pie:inferlet` import.

wasmtime-py's own callback rebuilds the function's type through the C API on every call; this
one compiles a `Signature` (see wasm_values.py) the first time a program calls a function and
keeps it under the program's hash. A component's import types are part of its bytes, so the
plan fits every later call from that program; a program that declares odd types gets plans
that read its own values faithfully, and the host functions refuse what they do not expect.

Nothing may escape the callback as a Python exception (wasmtime-py would park it in a module
global that another instance's thread re-raises): every failure becomes a trap of the caller.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime import component as wc

from pie.runtime import wasm_values
from pie.runtime.host.state import InstanceHost, current_host

log = logging.getLogger(__name__)

# (instance, raw store context, *arguments) -> result, for one WIT function
HostCall = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Signature:
    params: list[wasm_values.Lift]
    result: wasm_values.Lower | None


@dataclass(slots=True)
class HostFunction:
    name: str  # "interface.function", for messages
    call: HostCall
    plans: dict[str, Signature] = field(default_factory=dict)  # program hash -> plan

    def signature(self, program: str, ty_raw: Any) -> Signature:
        plan = self.plans.get(program)
        if plan is None:
            plan = self.plans[program] = _compile(self.name, ty_raw)
        return plan


_FUNCTIONS: dict[int, HostFunction] = {}
# Host calls served by this process (read by the benchmarks; a list so no lock is needed to bump
# it under the GIL).
CALLS = [0]
_ids = itertools.count(1)  # never 0: a null `data` pointer reads back as None


def _compile(name: str, ty_raw: Any) -> Signature:
    # owner=True: the type is borrowed from wasmtime for this call, never deleted by us
    with wc.FuncType._from_ptr(ty_raw, owner=True) as ty:
        try:
            params = [wasm_values.lift(t) for _, t in ty.params]
            result = None if ty.result is None else wasm_values.lower(ty.result)
        except wasm_values.Unsupported as e:
            raise wasmtime.WasmtimeError(
                f"{name}: the trampoline cannot convert WIT type {e}; extend wasm_values.py"
            ) from None
    return Signature(params, result)


def _error(message: str) -> int | None:
    """A wasmtime_error_t* for the callback to return (wasmtime frees it)."""
    return ctypes.cast(ffi.wasmtime_error_new(message.encode("utf-8")), ctypes.c_void_p).value


@ffi.wasmtime_component_func_callback_t  # type: ignore[misc]
def _dispatch(
    data: int | None, context: Any, ty_raw: Any, args: Any, nargs: int, results: Any, nres: int
) -> int | None:
    function = _FUNCTIONS.get(data or 0)
    host: InstanceHost | None = None
    CALLS[0] += 1
    try:
        if function is None:
            return _error("call of an unregistered host function")
        host = current_host()
        if host is None:
            return _error(f"{function.name} called from a thread that runs no inferlet")
        plan = function.signature(host.program, ty_raw)
        if nargs != len(plan.params) or nres != (plan.result is not None):
            return _error(f"{function.name}: called with {nargs} arguments and {nres} results")
        value = function.call(host, context, *[lift(args[i]) for i, lift in enumerate(plan.params)])
        if plan.result is not None:
            plan.result(value, results[0])
        return 0
    except wasmtime.WasmtimeError as e:
        return _error(str(e))
    except wasm_values.TooLarge as e:
        reason = f"{function.name if function else 'host call'}: {e}"
        if host is not None:
            host.trap_reason = reason
        return _error(reason)
    except BaseException as e:  # a conversion bug: end the caller, never the process
        name = function.name if function else "host call"
        log.exception("converting the values of %s failed", name)
        reason = f"internal error in host call {name}: {e!r}"
        if host is not None:
            host.trap_reason = reason
        return _error(reason)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _forget(data: int | None) -> None:
    _FUNCTIONS.pop(data or 0, None)


def add_function(instance: wc.LinkerInstance, name: str, qualified: str, call: HostCall) -> None:
    """Defines `name` in a linker instance as `call(host, context, *args)`."""
    key = next(_ids)
    _FUNCTIONS[key] = HostFunction(qualified, call)
    encoded = name.encode("utf-8")
    error = ffi.wasmtime_component_linker_instance_add_func(
        instance.ptr(), ctypes.create_string_buffer(encoded), len(encoded), _dispatch, key, _forget
    )
    if error:
        _FUNCTIONS.pop(key, None)
        raise wasmtime.WasmtimeError._from_ptr(error)
