"""The `pie` command line as a user meets it: errors in a line or two with the documented exit
code (no traceback unless --verbose), the help text, --version, a prompt longer than the model's
context refused before any forward, and progress shown only on a terminal.

Commands run as subprocesses (`python -m pie.cli`); every user error here fails before a model
loads, except those marked slow."""

from __future__ import annotations

import io
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from pie import cli
from pie.cli_errors import EXIT_FAILED, EXIT_USAGE, UsageError, step
from pie.engine.errors import InvalidBatchError
from pie.engine.generate import generate

ROOT = Path(__file__).resolve().parent.parent
HELP_SNAPSHOT = Path(__file__).with_name("cli_help.txt")
CHATTY = ROOT / "tests" / "server" / "inferlets" / "chatty.py"


def pie(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pie.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_report(done: subprocess.CompletedProcess[str], command: str, code: int) -> str:
    """The command failed with `code`, told in one or two lines, without a traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and 1 <= len(lines) <= 2, done.stderr
    assert lines[0].startswith(f"pie {command}: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inputs")
    (root / "notes.txt").write_text("not a model\n")
    (root / "fake.gguf").write_bytes(b"not a gguf at all")
    gemma = root / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text('{"architectures": ["GemmaForCausalLM"]}')
    (gemma / "model.safetensors").write_bytes(b"")
    (root / "broken.py").write_text("async def main(args:\n    return 'x'\n")
    (root / "random.wasm").write_bytes(bytes(range(256)) * 4)
    return {
        "random": str(root / "random.wasm"),
        "notes": str(root / "notes.txt"),
        "fake": str(root / "fake.gguf"),
        "gemma": str(gemma),
        "broken": str(root / "broken.py"),
        "missing": str(root / "missing"),
    }


# ---- user errors: one clear line, the scheme's exit code, no traceback -----------------------
USER_ERRORS = [
    # (arguments with {placeholders}, exit code, what the line says)
    (["generate", "--model", "{missing}", "hi"], EXIT_USAGE, "model not found"),
    (["generate", "--model", "{notes}", "hi"], EXIT_USAGE, "expected a .gguf file or a folder"),
    (["generate", "--model", "{fake}", "hi"], EXIT_USAGE, "not a GGUF file"),
    (["generate", "--model", "{gemma}", "hi"], EXIT_USAGE, "unsupported model architecture"),
    (["generate", "--device", "tpu9", "hi"], EXIT_USAGE, "--device tpu9: not a device"),
    (["generate", "--raw", ""], EXIT_USAGE, "the prompt is empty"),
    (["generate", "--max-tokens", "0", "hi"], EXIT_USAGE, "--max-tokens must be at least 1"),
    (["run", "{missing}.py"], EXIT_USAGE, "no such file"),
    (["run", "--native", "--model", "{missing}", str(CHATTY)], EXIT_USAGE, "model not found"),
    (["run", "{broken}"], EXIT_FAILED, "build failed: {broken}:1: SyntaxError"),
    (["run", "{random}"], EXIT_USAGE, "is not a WebAssembly component"),
    (["build", "{broken}"], EXIT_FAILED, "build failed: {broken}:1: SyntaxError"),
    (["build", "{missing}.py"], EXIT_USAGE, "no such file"),
    (["serve", "--config", "{missing}.toml"], EXIT_USAGE, "does not exist"),
    (["serve", "--port", "0", "--model", "{fake}"], EXIT_USAGE, "not a GGUF file"),
    (["export-hf", "{missing}.gguf", "{missing}-out"], EXIT_USAGE, "model not found"),
]


@pytest.mark.parametrize(
    ("argv", "code", "says"), USER_ERRORS, ids=[f"{a[0]}: {s}" for a, _, s in USER_ERRORS]
)
def test_user_error_is_one_line(
    bad_inputs: dict[str, str], argv: list[str], code: int, says: str
) -> None:
    done = pie(*[a.format(**bad_inputs) for a in argv])
    command = argv[0]
    if command == "serve":  # its load display leaves its last state on a pipe: the report ends
        done.stderr = done.stderr.strip().splitlines()[-1]
    line = assert_one_report(done, command, code)
    assert says.format(**bad_inputs) in line


@pytest.mark.parametrize("command", ["generate", "run", "serve"])
def test_cuda_on_a_cpu_torch_is_a_usage_error(command: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    argv = {"run": ["run", str(CHATTY)], "generate": ["generate", "hi"], "serve": ["serve"]}
    line = assert_one_report(pie(*argv[command], "--device", "cuda"), command, EXIT_USAGE)
    assert "--device cuda:" in line and "--device cpu" in line


def test_verbose_adds_the_traceback(bad_inputs: dict[str, str]) -> None:
    done = pie("generate", "--model", bad_inputs["missing"], "hi", "--verbose")
    assert done.returncode == EXIT_USAGE
    assert "Traceback (most recent call last)" in done.stderr and "ModelLoadError" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("pie generate: model not found")


def test_a_bad_flag_is_a_usage_error() -> None:
    done = pie("generate", "--bogus", "hi")
    assert done.returncode == EXIT_USAGE and "unrecognized arguments: --bogus" in done.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["x.py", "--", "--ttl", "5"], ["--ttl", "5"]),  # argparse alone dropped this `--`
        (["x.py", "--native", "--", "--ttl", "5"], ["--ttl", "5"]),
        (["x.py", "a", "b"], ["a", "b"]),
        (["x.py", "a", "--native", "--", "--", "b"], ["a", "--", "b"]),
    ],
)
def test_run_passes_what_follows_dashes_to_the_inferlet(
    argv: list[str], expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pie.runtime import cli_commands

    seen: list[Any] = []
    monkeypatch.setattr(cli_commands, "_run", lambda args: seen.append(args) or 0)
    assert cli.main(["run", *argv]) == 0
    assert seen[0].args == expected and seen[0].program == "x.py"


def test_syntax_error_found_before_the_model_loads(bad_inputs: dict[str, str]) -> None:
    done = pie("run", "--model", bad_inputs["missing"], bad_inputs["broken"])
    assert_one_report(done, "run", EXIT_FAILED)  # the source is checked before the model
    assert "SyntaxError" in done.stderr and "model not found" not in done.stderr


# ---- the context length -----------------------------------------------------------------------
def test_fitted_max_tokens() -> None:
    assert cli.fitted_max_tokens(100, 128, 8192) == 128
    assert cli.fitted_max_tokens(8000, 500, 8192) == 192  # cut to what the context leaves
    with pytest.raises(UsageError, match=r"the prompt is 20,031 tokens, .* context is 8,192"):
        cli.fitted_max_tokens(20_031, 128, 8192)
    with pytest.raises(UsageError, match="empty"):
        cli.fitted_max_tokens(0, 128, 8192)


def test_generate_refuses_a_long_prompt_before_any_forward() -> None:
    def execute(batch: Any) -> Any:
        raise AssertionError("a forward ran")

    engine = SimpleNamespace(max_position=64, page_size=16, num_pages=1000, execute=execute)
    with pytest.raises(InvalidBatchError, match=r"prompt 0 is 60 tokens; .* context is 64"):
        generate(cast(Any, engine), [[1] * 60], 8)
    few_pages = SimpleNamespace(max_position=64, page_size=16, num_pages=1, execute=execute)
    with pytest.raises(InvalidBatchError, match="context is 64"):  # the context speaks first
        generate(cast(Any, few_pages), [[1] * 60], 8)


@pytest.mark.slow
def test_pie_generate_long_prompt_says_tokens_and_context() -> None:
    done = pie("generate", "word " * 20_000)
    line = assert_one_report(done, "generate", EXIT_USAGE)
    assert re.search(r"the prompt is 20,\d{3} tokens, the model's context is 8,192", line), line


@pytest.mark.slow
def test_pie_generate_prints_prefill_and_decode_rates() -> None:
    done = pie("generate", "What is the capital of France?", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    stats = done.stderr.strip().splitlines()[-1]
    assert re.search(
        r"\d+ prompt tokens, prefill in [\d.]+ s \([\d.]+ tok/s\); \d+ new tokens, "
        r"decode in [\d.]+ s \([\d.-]+ tok/s\)\]$",
        stats,
    ), stats


@pytest.mark.slow
def test_inferlet_failure_printed_once() -> None:
    """In-process instances log their end; `pie run` reports the failure once, with where."""
    done = pie("run", "--native", str(CHATTY), "--", "fail")
    line = assert_one_report(done, "run", EXIT_FAILED)
    assert line == "pie run: ValueError: asked to fail"
    assert done.stderr.count("asked to fail") == 1
    assert "tests/server/inferlets/chatty.py:" in done.stderr  # the program's own frame


# ---- options, help, version -----------------------------------------------------------------------
def test_run_and_generate_size_the_pool_alike() -> None:
    parser = cli.build_parser()
    for argv in (["generate", "hi"], ["run", "x.py"], ["serve"]):
        assert parser.parse_args(argv).kv_pages is None  # sized to memory and the context
    run = parser.parse_args(["run", "--dtype", "bfloat16", "--kv-pages", "64", "x.py"])
    assert (run.dtype, run.kv_pages) == ("bfloat16", 64)


def _parsers() -> dict[str, Any]:
    parser = cli.build_parser()
    (commands,) = [a.choices for a in parser._actions if isinstance(a.choices, dict)]
    return {"pie": parser, **{f"pie {n}": p for n, p in commands.items()}}


def test_every_option_has_help_and_every_command_examples() -> None:
    for name, parser in _parsers().items():
        assert parser.description, f"{name} has no description"
        assert "example" in (parser.epilog or ""), f"{name} has no examples"
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def help_text() -> str:
    """Every command's --help at 100 columns, as one text."""
    os.environ["COLUMNS"] = "100"
    try:
        return "\n".join(f"==== {n} --help\n{p.format_help()}" for n, p in _parsers().items())
    finally:
        del os.environ["COLUMNS"]


def test_help_snapshot() -> None:
    """`tests/cli_help.txt` holds every --help. After changing an option, regenerate it with
    `PIE_UPDATE_SNAPSHOT=1 python -m pytest tests/test_cli.py::test_help_snapshot` and read
    the diff. argparse's layout changes between Python versions (3.13 prints `-o, --output
    OUTPUT`): the snapshot's first line names the version it was taken with."""
    version = f"# python {sys.version_info.major}.{sys.version_info.minor}"
    text = f"{version}\n{help_text()}"
    if os.environ.get("PIE_UPDATE_SNAPSHOT"):
        HELP_SNAPSHOT.write_text(text)
    stored = HELP_SNAPSHOT.read_text()
    if not stored.startswith(version + "\n"):
        pytest.skip(f"snapshot taken with {stored.splitlines()[0]}, this is {version}")
    assert text == stored


def test_version_names_the_host_and_guest_pythons() -> None:
    done = pie("--version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"pie {metadata.version('pie-python')}"
    assert lines[1].startswith(f"host Python: CPython {platform.python_version()} ")
    componentize = metadata.version("componentize-py")
    assert lines[2].startswith(f"guest Python: CPython 3.14 (componentize-py {componentize})")


def test_guest_python_read_from_componentize_py() -> None:
    # componentize-py is pinned (pyproject.toml); 0.25.1 bundles CPython 3.14. A new pin that
    # bundles another CPython fails here: update the expected version.
    assert metadata.version("componentize-py") == "0.25.1"
    assert cli.guest_python() == "3.14"


# ---- progress ---------------------------------------------------------------------------------
def test_progress_only_on_a_terminal() -> None:
    from rich.console import Console

    shown = io.StringIO()
    with step("loading the model", console=Console(file=shown, force_terminal=True)):
        pass
    assert "loading the model" in shown.getvalue()
    quiet = io.StringIO()
    with step("loading the model", console=Console(file=quiet, force_terminal=False)):
        pass
    assert quiet.getvalue() == ""
