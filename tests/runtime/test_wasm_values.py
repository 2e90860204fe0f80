"""The compiled value converters against wasmtime-py's own, on the WIT types of a real component.

Every case goes both ways: our lowering read back by wasmtime's lifting, and wasmtime's lowering
read back by ours, each equal to the value. Lists are tried short (ctypes) and long (numpy).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from wasmtime import _ffi as ffi
from wasmtime import component as wc

from pie.runtime import wasm_values
from pie.runtime.component_cache import ComponentCache
from pie.runtime.wit import interface_name


@pytest.fixture(scope="module")
def functions(pie_cache: Path, probe_wasm: Path) -> Iterator[dict[str, Any]]:
    """interface.function -> FuncType, as the probe component imports them."""
    config = wasmtime.Config()
    config.epoch_interruption = True  # the runtime's configuration: its compiled cache fits
    engine = wasmtime.Engine(config)
    _, component = ComponentCache(engine, "epoch", pie_cache / "compiled").load(
        probe_wasm.read_bytes()
    )
    found = {}
    for name, extern in component.type.imports(engine).items():
        for interface in ("forward", "poll", "model", "runtime", "session"):
            if name == interface_name(interface):
                for fn, item in extern.ty.exports(engine).items():
                    if isinstance(item.ty, wc.FuncType):
                        found[f"{interface}.{fn}"] = item.ty
    found["_store"] = wasmtime.Store(engine)
    yield found


def param(functions: dict[str, Any], name: str, index: int) -> Any:
    return functions[name].params[index][1]


def result(functions: dict[str, Any], name: str) -> Any:
    return functions[name].result


def record(**fields: Any) -> wc.Record:
    out = wc.Record()
    for key, value in fields.items():
        setattr(out, key.replace("_", "-"), value)
    return out


def forward_args(tokens: list[int], logit_mask: list[int] | None) -> wc.Record:
    greedy = wc.Variant("greedy")
    sample = wc.Variant(
        "sample", record(temperature=0.5, top_k=3, top_p=1.0, min_p=0.0, seed=2**40)
    )
    return record(
        tokens=tokens,
        positions=None,
        attention_mask=[[0, len(tokens)], [1, 2]],
        logit_mask=logit_mask,
        outputs=[record(index=0, sampler=greedy), record(index=1, sampler=sample)],
    )


LONG = list(range(100, 140))  # longer than wasm_values.SHORT: the numpy path
CASES = [
    ("param", "forward.execute-wait", 1, forward_args([1, 2], None)),
    ("param", "forward.execute-wait", 1, forward_args(LONG, [0, 7, 3])),
    ("param", "poll.wait-any", 0, [7, 7, 9]),
    ("param", "poll.wait-any", 0, LONG),
    ("param", "poll.wait-any", 1, None),
    ("param", "poll.wait-any", 1, 250),
    ("param", "session.send-blob", 0, b"\x00\x01\xff"),
    ("param", "session.send-blob", 0, bytes(range(200))),
    ("param", "model.encode", 1, "héllo, wörld"),
    ("result", "forward.execute-wait", 0, [wc.Variant("token", 5), wc.Variant("entropy", 0.5)]),
    ("result", "forward.execute-wait", 0, [wc.Variant("distribution", ([1, 2], [0.75, 0.25]))]),
    ("result", "forward.execute-wait", 0, "refused: a reason"),
    ("result", "forward.logits-top-k", 0, (LONG, [float(x) for x in LONG])),
    ("result", "model.token-text", 0, wc.Variant("ok", "abc")),
    ("result", "model.token-text", 0, wc.Variant("ok", None)),
    ("result", "model.token-text", 0, wc.Variant("err", "no such model")),
    ("result", "model.special-tokens", 0, [("<|im_end|>", 2), ("<pad>", 0)]),
    ("result", "model.info", 0, record(name="m", vocab_size=9, page_size=4, max_position=99)),
    ("result", "poll.is-ready", 0, True),
    ("result", "runtime.instance-id", 0, 2**40 + 3),
    ("result", "poll.discard", 0, None),
    ("result", "poll.discard", 0, "future 3 is not open"),
]


@pytest.mark.parametrize(("where", "name", "index", "value"), CASES)
def test_both_ways_agree_with_wasmtime(
    functions: dict[str, Any], where: str, name: str, index: int, value: Any
) -> None:
    ty = param(functions, name, index) if where == "param" else result(functions, name)
    mine = wasm_values.VAL()
    wasm_values.lower(ty)(value, mine)
    assert ty.convert_from_c(mine) == value  # wasmtime reads what we wrote...
    ffi.wasmtime_component_val_delete(ctypes.byref(mine))
    theirs = wasm_values.VAL()
    ty.convert_to_c(functions["_store"], value, ctypes.pointer(theirs))
    assert wasm_values.lift(ty)(theirs) == value  # ...and we read what wasmtime wrote
    ffi.wasmtime_component_val_delete(ctypes.byref(theirs))


def test_a_value_of_the_wrong_type_is_refused_and_leaves_a_droppable_value(
    functions: dict[str, Any],
) -> None:
    ty = result(functions, "forward.execute-wait")
    slot = wasm_values.VAL()
    with pytest.raises(TypeError):
        wasm_values.lower(ty)([wc.Variant("token", "not a number")], slot)
    ffi.wasmtime_component_val_delete(ctypes.byref(slot))  # no crash: still well formed
    for numbers in ([1, -1], [*LONG, 2**32]):  # both list paths: ctypes would wrap silently
        with pytest.raises(OverflowError):
            wasm_values.lower(param(functions, "poll.wait-any", 0))(numbers, slot)
        ffi.wasmtime_component_val_delete(ctypes.byref(slot))
