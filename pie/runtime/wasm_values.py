"""Component values across the wasm boundary: converters compiled once per WIT type.

wasmtime-py converts a host call's arguments and result by walking the function's type through
the C API on every call (dozens of FFI calls per call, each one a point where the GIL changes
hands) and converts lists element by element (~1.25 µs each). Here a type is compiled once into
a pair of closures: `lift` reads a `wasmtime_component_val_t` argument straight from memory (no
FFI call: wasmtime drops the arguments itself after the call), `lower` writes a result that
wasmtime takes ownership of. Lists of numbers go through numpy views over the value array:

    list.data: [ kind u8 | pad | payload (8..) ] [ kind | pad | payload ] ...   (VAL_SIZE each)

The Python values are the ones wasmtime-py itself produces and accepts (`Record` with the WIT
field names, `Variant` where cases cannot be told apart by their Python class), so host code
cannot tell the two paths apart.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from wasmtime import _bindings, _ffi
from wasmtime import component as wc

ffi = _ffi


def _keeping_gil(name: str) -> Any:
    """wasmtime's C function `name`, called without releasing the GIL.

    ctypes releases the GIL around every foreign call, which invites a thread switch (up to a
    switch interval of waiting to get it back) for calls that only allocate a few bytes.
    """
    declared = getattr(_bindings, f"_{name}")  # wasmtime-py's prototype: argument types
    return ctypes.PYFUNCTYPE(declared.restype, *declared.argtypes)((name, ffi.dll))


new_list = _keeping_gil("wasmtime_component_vallist_new_uninit")
new_tuple = _keeping_gil("wasmtime_component_valtuple_new_uninit")
new_record = _keeping_gil("wasmtime_component_valrecord_new_uninit")
new_box = _keeping_gil("wasmtime_component_val_new")
new_bytes = _keeping_gil("wasm_byte_vec_new")

Lift = Callable[[Any], Any]  # wasmtime_component_val_t -> Python value
Lower = Callable[[Any, Any], None]  # (Python value, wasmtime_component_val_t to fill) -> None

VAL = ffi.wasmtime_component_val_t
VAL_SIZE = ctypes.sizeof(VAL)
PAYLOAD = VAL.of.offset  # where the union starts inside a value
ENTRY = ffi.wasmtime_component_valrecord_entry_t
BYTES = ctypes.POINTER(ffi.wasm_byte_t)
# Lists up to this long are converted element by element through ctypes; numpy views cost
# more to set up than that many ctypes field accesses (a decode step's lists are 1 long).
SHORT = 16
# Elements of one list argument: each costs host time under the GIL, so a longer list is
# refused before any element is read (the host's own limits are all far below this).
MAX_LIST = 1 << 24


@dataclass(frozen=True, slots=True)
class Scalar:
    field: str  # member of the value union
    kind: int  # WASMTIME_COMPONENT_* tag
    python: type | tuple[type, ...]  # what lowering accepts
    dtype: type  # numpy element type of a list of these

    @property
    def bounds(self) -> tuple[int, int] | None:
        """The range of an integer type (ctypes would wrap silently), None for the others."""
        if self.python is not int:
            return None
        info = np.iinfo(self.dtype)
        return int(info.min), int(info.max)


SCALARS: dict[type, Scalar] = {
    wc.Bool: Scalar("boolean", ffi.WASMTIME_COMPONENT_BOOL.value, bool, np.bool_),
    wc.S8: Scalar("s8", ffi.WASMTIME_COMPONENT_S8.value, int, np.int8),
    wc.U8: Scalar("u8", ffi.WASMTIME_COMPONENT_U8.value, int, np.uint8),
    wc.S16: Scalar("s16", ffi.WASMTIME_COMPONENT_S16.value, int, np.int16),
    wc.U16: Scalar("u16", ffi.WASMTIME_COMPONENT_U16.value, int, np.uint16),
    wc.S32: Scalar("s32", ffi.WASMTIME_COMPONENT_S32.value, int, np.int32),
    wc.U32: Scalar("u32", ffi.WASMTIME_COMPONENT_U32.value, int, np.uint32),
    wc.S64: Scalar("s64", ffi.WASMTIME_COMPONENT_S64.value, int, np.int64),
    wc.U64: Scalar("u64", ffi.WASMTIME_COMPONENT_U64.value, int, np.uint64),
    wc.F32: Scalar("f32", ffi.WASMTIME_COMPONENT_F32.value, (float, int), np.float32),
    wc.F64: Scalar("f64", ffi.WASMTIME_COMPONENT_F64.value, (float, int), np.float64),
}
STRING = ffi.WASMTIME_COMPONENT_STRING.value
LIST = ffi.WASMTIME_COMPONENT_LIST.value
RECORD = ffi.WASMTIME_COMPONENT_RECORD.value
TUPLE = ffi.WASMTIME_COMPONENT_TUPLE.value
VARIANT = ffi.WASMTIME_COMPONENT_VARIANT.value
ENUM = ffi.WASMTIME_COMPONENT_ENUM.value
OPTION = ffi.WASMTIME_COMPONENT_OPTION.value
RESULT = ffi.WASMTIME_COMPONENT_RESULT.value
CHAR = ffi.WASMTIME_COMPONENT_CHAR.value


class Unsupported(Exception):
    """A WIT type this module does not compile (resources, flags, ...)."""


class TooLarge(Exception):
    """A list argument longer than MAX_LIST."""


# ---- memory helpers ---------------------------------------------------------------------------
def _text(vec: Any) -> str:
    return ctypes.string_at(vec.data, vec.size).decode("utf-8")


def _set_text(vec: Any, text: str) -> None:
    """Fills an empty wasm_name_t with a copy of `text` (wasmtime frees it)."""
    _set_bytes(vec, text.encode("utf-8"))


def _set_bytes(vec: Any, data: bytes) -> None:
    new_bytes(ctypes.byref(vec), len(data), ctypes.cast(ctypes.c_char_p(data), BYTES))


def _raw(pointer: Any, nbytes: int) -> Any:
    """A ctypes byte buffer over `nbytes` at `pointer`, for numpy views."""
    address = ctypes.cast(pointer, ctypes.c_void_p).value
    assert address, "a non-empty value array at address 0"
    return (ctypes.c_char * nbytes).from_address(address)


def _strided(raw: Any, n: int, dtype: type, offset: int) -> np.ndarray:
    """One `dtype` field per value of an array of n values."""
    return np.ndarray((n,), dtype=dtype, buffer=raw, offset=offset, strides=(VAL_SIZE,))


def _new_values(n: int, make: Callable[[Any, int], None], holder: Any) -> Any:
    """Allocates n values with `make(holder, n)`, all Bool(false): droppable if filling fails."""
    make(ctypes.byref(holder), n)
    data = holder.data
    if n > SHORT:
        np.frombuffer(_raw(data, n * VAL_SIZE), dtype=np.uint8)[:] = 0
    else:
        for i in range(n):
            item = data[i]
            item.kind = 0
            item.of.u64 = 0  # the widest scalar: the boolean byte reads false
    return data


def _boxed(lower: Lower, value: Any) -> Any:
    """A heap value holding `value` (a variant, option or result payload)."""
    slot = VAL()
    lower(value, slot)
    return new_box(ctypes.byref(slot))  # moves `slot` into the box


# ---- lifting (guest → host) -------------------------------------------------------------------
def lift(ty: Any) -> Lift:
    scalar = SCALARS.get(type(ty))
    if scalar is not None:
        field = scalar.field
        return lambda c: getattr(c.of, field)
    if isinstance(ty, wc.String):
        return lambda c: _text(c.of.string)
    if isinstance(ty, wc.Char):
        return lambda c: chr(c.of.character)
    if isinstance(ty, wc.ListType):
        return _lift_list(ty.element)
    if isinstance(ty, wc.RecordType):
        return _lift_record([(name, lift(t)) for name, t in ty.fields])
    if isinstance(ty, wc.TupleType):
        items = [lift(t) for t in ty.elements]
        return lambda c: tuple(f(c.of.tuple.data[i]) for i, f in enumerate(items))
    if isinstance(ty, wc.EnumType):
        return lambda c: _text(c.of.enumeration)
    if isinstance(ty, (wc.VariantType, wc.OptionType, wc.ResultType)):
        return _lift_variant(ty)
    raise Unsupported(type(ty).__name__)


def _size(c: Any) -> int:
    n = int(c.of.list.size)
    if n > MAX_LIST:
        raise TooLarge(f"a list argument of {n} elements; at most {MAX_LIST} cross in one call")
    return n


def _lift_list(element: Any) -> Lift:
    scalar = SCALARS.get(type(element))
    if scalar is None:
        item = lift(element)

        def lift_items(c: Any) -> list[Any]:
            data = c.of.list.data
            return [item(data[i]) for i in range(_size(c))]

        return lift_items
    dtype, as_bytes = scalar.dtype, isinstance(element, wc.U8)

    field = scalar.field

    def lift_numbers(c: Any) -> Any:
        n = _size(c)
        data = c.of.list.data
        if n <= SHORT:
            items = [getattr(data[i].of, field) for i in range(n)]
            return bytes(items) if as_bytes else items
        values = _strided(_raw(data, n * VAL_SIZE), n, dtype, PAYLOAD)
        return values.tobytes() if as_bytes else values.tolist()

    return lift_numbers


def _lift_record(fields: list[tuple[str, Lift]]) -> Lift:
    def lift_record(c: Any) -> wc.Record:
        data = c.of.record.data
        record = wc.Record()
        slots = record.__dict__
        for i, (name, field) in enumerate(fields):
            slots[name] = field(data[i].val)
        return record

    return lift_record


def _cases(ty: Any) -> list[tuple[str, Any]]:
    if isinstance(ty, wc.OptionType):
        return [("none", None), ("some", ty.payload)]
    if isinstance(ty, wc.ResultType):
        return [("ok", ty.ok), ("err", ty.err)]
    return list(ty.cases)


def _classes(ty: Any) -> set[type]:
    found: set[type] = set()
    if ty is None:
        found.add(object)
    else:
        ty.add_classes(found)
    return found


def _tagged(cases: list[tuple[str, Any]]) -> bool:
    """wasmtime-py's rule: a Variant object unless each case has Python classes of its own."""
    seen: set[type] = set()
    for _, ty in cases:
        classes = _classes(ty)
        if classes & seen:
            return True
        seen |= classes
    return False


def _lift_variant(ty: Any) -> Lift:
    cases = _cases(ty)
    tagged = _tagged(cases)
    payloads = {name: None if t is None else lift(t) for name, t in cases}

    def finish(tag: str, pointer: Any) -> Any:
        field = payloads[tag]
        value = None if field is None else field(pointer.contents)
        return wc.Variant(tag, value) if tagged else value

    if isinstance(ty, wc.OptionType):
        return lambda c: finish("some" if c.of.option else "none", c.of.option)
    if isinstance(ty, wc.ResultType):
        return lambda c: finish("ok" if c.of.result.is_ok else "err", c.of.result.val)
    return lambda c: finish(_text(c.of.variant.discriminant), c.of.variant.val)


# ---- lowering (host → guest) ------------------------------------------------------------------
def lower(ty: Any) -> Lower:
    scalar = SCALARS.get(type(ty))
    if scalar is not None:
        return _lower_scalar(scalar)
    if isinstance(ty, wc.String):

        def lower_string(value: Any, dst: Any) -> None:
            if not isinstance(value, str):
                raise TypeError(f"expected str, got {type(value).__name__}")
            _set_text(dst.of.string, value)
            dst.kind = STRING

        return lower_string
    if isinstance(ty, wc.ListType):
        return _lower_list(ty.element)
    if isinstance(ty, wc.RecordType):
        return _lower_record([(name, lower(t)) for name, t in ty.fields])
    if isinstance(ty, wc.TupleType):
        return _lower_tuple([lower(t) for t in ty.elements])
    if isinstance(ty, wc.EnumType):
        return _lower_enum(set(ty.names))
    if isinstance(ty, (wc.VariantType, wc.OptionType, wc.ResultType)):
        return _lower_variant(ty)
    raise Unsupported(type(ty).__name__)


def _lower_enum(names: set[str]) -> Lower:
    def lower_enum(value: Any, dst: Any) -> None:
        if value not in names:
            raise TypeError(f"expected one of {sorted(names)}, got {value!r}")
        _set_text(dst.of.enumeration, value)
        dst.kind = ENUM

    return lower_enum


def _lower_scalar(scalar: Scalar) -> Lower:
    field, kind, python, bounds = scalar.field, scalar.kind, scalar.python, scalar.bounds

    def lower_scalar(value: Any, dst: Any) -> None:
        if not isinstance(value, python):
            raise TypeError(f"expected {python}, got {type(value).__name__}")
        if bounds is not None and not bounds[0] <= cast(int, value) <= bounds[1]:
            raise OverflowError(f"{value} is outside [{bounds[0]}, {bounds[1]}]")
        setattr(dst.of, field, value)
        dst.kind = kind

    return lower_scalar


def _lower_list(element: Any) -> Lower:
    scalar = SCALARS.get(type(element))
    new = new_list
    if scalar is None:
        item = lower(element)

        def lower_items(value: Any, dst: Any) -> None:
            dst.kind = LIST
            data = _new_values(len(value), new, dst.of.list)
            for i, x in enumerate(value):
                item(x, data[i])

        return lower_items
    dtype, kind = scalar.dtype, scalar.kind

    item = _lower_scalar(scalar)

    def lower_numbers(value: Any, dst: Any) -> None:
        n = len(value)
        dst.kind = LIST
        data = _new_values(n, new, dst.of.list)
        if n <= SHORT:
            for i, x in enumerate(value):
                item(x, data[i])
            return
        if isinstance(value, (bytes, bytearray)):
            value = np.frombuffer(value, dtype=np.uint8)
        raw = _raw(data, n * VAL_SIZE)
        _strided(raw, n, np.uint8, 0)[:] = kind
        _strided(raw, n, dtype, PAYLOAD)[:] = value  # numpy refuses out-of-range ints

    return lower_numbers


def _lower_record(fields: list[tuple[str, Lower]]) -> Lower:
    def lower_record(value: Any, dst: Any) -> None:
        dst.kind = RECORD
        record = dst.of.record
        new_record(ctypes.byref(record), len(fields))
        entries = record.data
        if fields:  # every name first: the entries are droppable whatever fails next
            size = len(fields) * ctypes.sizeof(ENTRY)
            np.frombuffer(_raw(entries, size), dtype=np.uint8)[:] = 0
            for i, (name, _) in enumerate(fields):
                _set_text(entries[i].name, name)
        for i, (name, field) in enumerate(fields):
            field(getattr(value, name), entries[i].val)

    return lower_record


def _lower_tuple(items: list[Lower]) -> Lower:
    new = new_tuple

    def lower_tuple(value: Any, dst: Any) -> None:
        if len(value) != len(items):
            raise TypeError(f"expected a tuple of {len(items)}, got {len(value)}")
        dst.kind = TUPLE
        data = _new_values(len(items), new, dst.of.tuple)
        for i, (field, x) in enumerate(zip(items, value, strict=True)):
            field(x, data[i])

    return lower_tuple


def _lower_variant(ty: Any) -> Lower:
    cases = _cases(ty)
    tagged = _tagged(cases)
    plans = [
        (name, None if t is None else lower(t), tuple(_classes(t)) if t is not None else ())
        for name, t in cases
    ]
    by_name = {name: (name, plan) for name, plan, _ in plans}

    def choose(value: Any) -> tuple[str, Lower | None, Any]:
        if tagged:
            if not isinstance(value, wc.Variant) or value.tag not in by_name:
                raise TypeError(f"expected a Variant with a tag in {sorted(by_name)}")
            return value.tag, by_name[value.tag][1], value.payload
        for name, plan, classes in plans:
            if plan is None and value is None:
                return name, None, None
            if plan is not None and isinstance(value, classes):
                return name, plan, value
        raise TypeError(f"{type(value).__name__} fits no case of {[n for n, _, _ in plans]}")

    def box(plan: Lower | None, payload: Any) -> Any:
        return None if plan is None else _boxed(plan, payload)

    if isinstance(ty, wc.OptionType):

        def lower_option(value: Any, dst: Any) -> None:
            _, plan, payload = choose(value)
            dst.of.option = box(plan, payload)
            dst.kind = OPTION

        return lower_option
    if isinstance(ty, wc.ResultType):

        def lower_result(value: Any, dst: Any) -> None:
            name, plan, payload = choose(value)
            dst.of.result.val = box(plan, payload)
            dst.of.result.is_ok = name == "ok"
            dst.kind = RESULT

        return lower_result

    names = {name: name.encode("utf-8") for name, _ in cases}

    def lower_variant(value: Any, dst: Any) -> None:
        name, plan, payload = choose(value)
        boxed = box(plan, payload)
        _set_bytes(dst.of.variant.discriminant, names[name])
        dst.of.variant.val = boxed
        dst.kind = VARIANT

    return lower_variant
