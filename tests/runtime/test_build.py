"""`pie build`: errors point at the user's file and line; builds are cached by content."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pie.runtime.build import build_inferlet, source_hash
from pie.runtime.errors import BuildError


def test_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    source = tmp_path / "broken.py"
    source.write_text("def main(args):\n    return 'ok'\n\nx = (1,\n")
    with pytest.raises(BuildError) as failed:
        build_inferlet(source)
    assert failed.value.location == f"{source}:4"
    assert "SyntaxError" in str(failed.value)


def test_bad_module_name_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "my-inferlet.py"
    source.write_text("def main(args):\n    return 'ok'\n")
    with pytest.raises(BuildError, match="not a Python module name"):
        build_inferlet(source)


def test_hash_changes_with_the_source(tmp_path: Path) -> None:
    source = tmp_path / "a.py"
    source.write_text("def main(args):\n    return 'a'\n")
    first = source_hash(source)
    source.write_text("def main(args):\n    return 'b'\n")
    assert source_hash(source) != first


@pytest.mark.slow
def test_a_module_that_loops_at_import_stops_at_the_build_time_limit(
    tmp_path: Path, pie_cache: Path
) -> None:
    source = tmp_path / "loops_at_import.py"
    source.write_text("while True:\n    pass\n\ndef main(args):\n    return 'never'\n")
    started = time.monotonic()
    with pytest.raises(BuildError, match="did not finish within 4 s") as failed:
        build_inferlet(source, timeout_s=4)
    assert time.monotonic() - started < 10
    assert failed.value.location == str(source.resolve())
    assert "top level" in str(failed.value)


@pytest.mark.slow
def test_import_time_error_points_at_the_user_line(tmp_path: Path, pie_cache: Path) -> None:
    source = tmp_path / "fails_at_import.py"
    source.write_text("import json\n\nVALUE = json.loads('{')\n\ndef main(args):\n    return ''\n")
    with pytest.raises(BuildError) as failed:
        build_inferlet(source)
    assert failed.value.location == f"{source}:3"
    assert "JSONDecodeError" in str(failed.value)


@pytest.mark.slow
def test_second_build_is_a_cache_hit(probe_wasm: Path, tmp_path: Path) -> None:
    from tests.runtime.conftest import PROBE

    started = time.monotonic()
    out = build_inferlet(PROBE, tmp_path / "probe.wasm")
    assert time.monotonic() - started < 1.0
    assert out.read_bytes() == probe_wasm.read_bytes()
