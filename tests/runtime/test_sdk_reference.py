"""The SDK's reference is generated from its code (pdoc), so it cannot drift from it: `pie.sdk`
imports on the host outside any inferlet, and the built reference names what a program needs.

Build it by hand: `python -m pdoc pie.sdk -o site/` (or `python -m pdoc pie.sdk` to browse).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.conftest import ROOT

pdoc = pytest.importorskip("pdoc")


def test_the_sdk_imports_on_the_host_and_says_where_it_runs() -> None:
    """A fresh interpreter (no `pie run`): `import pie.sdk` and `help()` work; a host call
    says it runs only inside an inferlet."""
    code = (
        "import pie.sdk, pydoc\n"
        "assert 'logit_mask' in pydoc.render_doc(pie.sdk.Context.next_token)\n"
        "try:\n    pie.sdk.send('x')\nexcept RuntimeError as e:\n    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "runs only inside an inferlet" in done.stdout


def test_the_reference_built_from_the_code_names_what_a_program_needs(tmp_path: Path) -> None:
    pdoc.pdoc("pie.sdk", output_directory=tmp_path)
    html = (tmp_path / "pie" / "sdk.html").read_text()
    anchors = set(re.findall(r'id="([A-Za-z_.]+)"', html))
    for name in (
        "Context",
        "Context.next_token",
        "Context.forward",
        "Context.generate",
        "Model.vocab_size",
        "Distribution.tokens",
        "Distribution.probs",
        "EndOfInput",
        "messages",
        "receive",
    ):
        assert name in anchors, f"{name} is missing from the SDK reference"
    for method in ("next_token", "forward"):
        start = html.index(f'id="Context.{method}"')
        signature = html[start : html.index("</div>", start)]
        assert "logit_mask" in signature, f"Context.{method} shows no logit_mask"


@pytest.mark.slow
def test_the_docs_name_the_python_the_guest_runs(pie_cache: Path, tmp_path: Path) -> None:
    """docs/api.md says which CPython a built inferlet runs in; a built one reports it."""
    from pie.runtime.runtime import Runtime
    from tests.runtime.fakes import FakeEngine

    source = tmp_path / "version.py"
    source.write_text("import sys\n\ndef main(args):\n    return '%d.%d' % sys.version_info[:2]\n")
    with Runtime(FakeEngine(num_pages=16), cache=pie_cache, workers=0) as rt:
        guest = rt.run(rt.add_source(source), [])
    assert f"CPython {guest}" in (ROOT / "docs" / "api.md").read_text()
