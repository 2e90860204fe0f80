"""`pie build x.js`: a JavaScript inferlet → a WebAssembly component, with componentize-js.

The WIT contract is language-neutral: componentize-js (the Bytecode Alliance's SpiderMonkey
embedding, from npm) builds an ES module against the same `pie:inferlet` world as componentize-py,
and the host runs the component like any other. The toolchain is installed with npm on first use,
pinned, under `cache_dir()/js`; components are cached by content hash (the module, the local
modules it imports, the WIT, the toolchain), so a second build is a file copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from pie.runtime.build import build_timeout, cache_dir
from pie.runtime.errors import BuildError
from pie.runtime.wit import WORLD, wit_dir, wit_hash

COMPONENTIZE_JS = "0.23.0"
# The host has WASI p2 (stdio, clocks, random) but no `wasi:http`: outgoing HTTP goes through
# pie's own `http` interface (an allow-list per launch), and an inferlet serves no requests.
DISABLED_FEATURES = ("http", "fetch-event")
# A build snapshots SpiderMonkey with the module loaded (10-20 s; minutes on a busy machine).
JS_BUILD_TIMEOUT_S = 300.0
INSTALL_TIMEOUT_S = 600.0  # a first install downloads ~150 packages (~390 MB unpacked)
_PACKAGE = "@bytecodealliance/componentize-js"
# Local modules a module loads: `import ... from './x.js'`, `import './x.js'`,
# `export ... from './x.js'` and `import('./x.js')`.
_LOCAL_IMPORT = re.compile(
    r"""\b(?:import|export)\s*(?:\(\s*|[^'";]*?\bfrom\s*)?['"](\.{1,2}/[^'"]+)['"]"""
)


def missing_tools() -> str | None:
    """Why a JavaScript inferlet cannot be built here (node or npm missing), else None."""
    absent = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if not absent:
        return None
    return (
        f"building a .js inferlet needs Node.js and npm ({' and '.join(absent)} not found on "
        "PATH); install Node.js 20 or later"
    )


def toolchain_dir() -> Path:
    return cache_dir() / "js" / f"componentize-js-{COMPONENTIZE_JS}"


def ensure_toolchain(timeout_s: float = INSTALL_TIMEOUT_S) -> Path:
    """The componentize-js CLI script, installed with npm on first use; returns its path."""
    folder = toolchain_dir()
    cli = folder / "node_modules" / _PACKAGE / "src" / "cli.js"
    if cli.is_file():
        return cli
    problem = missing_tools()
    if problem:
        raise BuildError(problem)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One install at a time (concurrent builds wait for the first one's), made beside its final
    # place and renamed in one step: a failed or killed install leaves nothing half-made.
    with open(folder.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cli.is_file():
            _install(folder, timeout_s)
    return cli


def _install(folder: Path, timeout_s: float) -> None:
    partial = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
    try:
        manifest = {"private": True, "dependencies": {_PACKAGE: COMPONENTIZE_JS}}
        (partial / "package.json").write_text(json.dumps(manifest))
        # No package's install scripts run: the toolchain needs none (its binaries are files).
        command = ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts"]
        try:
            done = subprocess.run(
                command, cwd=partial, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise BuildError(
                f"installing componentize-js {COMPONENTIZE_JS} with npm took over {timeout_s:g} s"
            ) from None
        if done.returncode != 0:
            cause = _npm_cause(done.stderr + done.stdout)
            raise BuildError(
                f"installing componentize-js {COMPONENTIZE_JS} with npm failed: {cause} "
                "(npm needs the registry, or a warm npm cache)"
            )
        shutil.rmtree(folder, ignore_errors=True)  # what an older, broken install left
        os.rename(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def local_modules(source: Path) -> list[Path]:
    """`source` and the local modules it imports, transitively, in a stable order.

    componentize-js reads modules from the source's folder only (it maps that folder as the
    guest's `/` while it snapshots the module), so an import from outside it is refused here.
    """
    root = source.resolve().parent
    found: list[Path] = []
    todo: list[tuple[Path, Path | None]] = [(source.resolve(), None)]
    while todo:
        path, importer = todo.pop()
        if path in found:
            continue
        where = None if importer is None else str(importer)
        if not path.is_relative_to(root):
            raise BuildError(
                f"imports {path}, outside the inferlet's folder {root}: componentize-js reads "
                "only that folder and below; move the module there",
                where,
            )
        if not path.is_file():
            raise BuildError(f"imports {path.name}, which does not exist", where)
        found.append(path)
        text = path.read_text(encoding="utf-8", errors="replace")
        todo += [((path.parent / spec).resolve(), path) for spec in _LOCAL_IMPORT.findall(text)]
    return found


def source_hash(source: Path) -> str:
    """Content hash of a build: the modules, the WIT, the toolchain and its options."""
    digest = hashlib.sha256(f"componentize-js {COMPONENTIZE_JS} {DISABLED_FEATURES}\0".encode())
    root = source.resolve().parent
    for path in local_modules(source):
        name = os.path.relpath(path, root)
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(wit_hash().encode())
    return digest.hexdigest()


def check_syntax(source: Path) -> None:
    """Parses the module with node first (no toolchain needed), so an error names its line."""
    problem = missing_tools()
    if problem:
        raise BuildError(problem)
    with tempfile.TemporaryDirectory(prefix="pie-js-check-") as tmp:
        staged = Path(tmp) / f"{source.stem}.mjs"  # .mjs: parsed as an ES module
        shutil.copyfile(source, staged)
        done = subprocess.run(
            ["node", "--check", str(staged)], capture_output=True, text=True, timeout=60
        )
    if done.returncode != 0:
        text = done.stderr.replace(str(staged), str(source))
        line = re.search(rf"{re.escape(str(source))}:(\d+)", text)
        summary = _last_line(text, "node --check failed", prefix="SyntaxError")
        raise BuildError(summary, f"{source}:{line.group(1)}" if line else str(source))


def build_js_inferlet(source: Path, output: Path | None, timeout_s: float | None) -> Path:
    """Builds `source` (a .js ES module exporting `run`); as `build.build_inferlet`."""
    src = source.resolve()
    check_syntax(src)
    cached = cache_dir() / "components" / f"{source_hash(src)}.wasm"
    if not cached.exists():
        cli = ensure_toolchain()
        cached.parent.mkdir(parents=True, exist_ok=True)
        _componentize(cli, src, cached, _build_timeout() if timeout_s is None else timeout_s)
    if output is None:
        return cached
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, output)
    return output


def _build_timeout() -> float:
    """$PIE_BUILD_TIMEOUT_S, else JS_BUILD_TIMEOUT_S."""
    return build_timeout() if os.environ.get("PIE_BUILD_TIMEOUT_S") else JS_BUILD_TIMEOUT_S


def _componentize(cli: Path, src: Path, target: Path, timeout_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="pie-build-js-") as tmp:
        partial = Path(tmp) / "out.wasm"
        command = [
            "node", str(cli), str(src), "--wit", str(wit_dir()), "--world-name", WORLD,
            "--disable", *DISABLED_FEATURES, "--out", str(partial),
        ]  # fmt: skip
        try:
            # Run in the source's folder: componentize-js maps the working directory instead
            # when the source lies under it, so the modules it reads would depend on the caller.
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, cwd=src.parent
            )
        except subprocess.TimeoutExpired:
            raise BuildError(
                f"componentize-js did not finish within {timeout_s:g} s: the module's top level "
                "runs during the build (it is snapshotted initialised); move long work into the "
                "`run` export (or raise $PIE_BUILD_TIMEOUT_S)",
                str(src),
            ) from None
        if done.returncode != 0 or not partial.exists():
            text = (done.stdout + done.stderr).strip()
            raise BuildError(
                f"{_last_line(text, 'componentize-js failed', prefix='Error')}\n"
                f"--- componentize-js output ---\n{text[-4000:]}",
                str(src),
            )
        # Atomic publish: concurrent builds of one source never see a half-written file.
        tmp_target = target.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(partial, tmp_target)
        os.replace(tmp_target, target)


def _last_line(text: str, default: str, prefix: str = "") -> str:
    """The line that says what failed: the last one starting with `prefix` (else the last)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    marked = [line for line in lines if prefix and prefix in line]
    return (marked or lines or [default])[-1]


def _npm_cause(output: str) -> str:
    """npm's reason for a failed install: its first error line that names one (a
    `FetchError: ... ECONNREFUSED`), else its first error line."""
    lines = [line.strip() for line in output.splitlines() if line.startswith("npm error")]
    named = [line for line in lines if "Error:" in line]
    return (named or lines or ["npm install failed"])[0].removeprefix("npm error").strip()
