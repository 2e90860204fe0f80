"""The WIT contract, the glue tables, and the compiled-component cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import wasmtime

from pie.runtime.component_cache import ComponentCache
from pie.runtime.wasm_bindings import FUNCTIONS
from pie.runtime.wit import INTERFACES, wit_dir


def test_every_interface_has_a_host_table_and_a_doc_section() -> None:
    assert set(FUNCTIONS) == set(INTERFACES)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    for interface in INTERFACES:
        assert (wit_dir() / f"{interface}.wit").exists()
        assert f"### `{interface}`" in docs


@pytest.mark.slow
def test_native_bindings_match_the_host_table(pie_cache: Path) -> None:
    from pie.runtime import native

    native.install()  # raises if a generated binding has no host function or vice versa
    import wit_world.imports.forward as generated

    assert generated.execute.__name__ == "execute"  # routed to the host adapter
    assert generated.execute.__module__ == "pie.runtime.native"


@pytest.mark.slow
def test_compiled_components_are_cached_on_disk(probe_wasm: Path, tmp_path: Path) -> None:
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    wasm = probe_wasm.read_bytes()
    digest, _ = ComponentCache(engine, "epoch", tmp_path).load(wasm)
    assert len(list(tmp_path.glob(f"{digest}-*.cwasm"))) == 1
    started = time.monotonic()
    again_digest, _ = ComponentCache(engine, "epoch", tmp_path).load(wasm)  # a new process's view
    assert again_digest == digest
    assert time.monotonic() - started < 0.5  # deserialized (~ms), not recompiled (~3 s)
