"""How a `pie` command ends and what it shows on the way: one exit-code scheme for every
subcommand, a failure told once in a line or two (`--verbose` adds the traceback), up-front
checks of what the user typed, a spinner naming the slow steps on a terminal, and the help
layout every subcommand shares.

Exit codes (`pie --help` lists them too):
  0    done
  1    the program or the run failed (an inferlet raised, a build failed, the engine refused)
  2    the command cannot take its input (a bad flag, a missing or unloadable model, a device
       this torch lacks, a prompt longer than the model's context, a bad config file)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    done
  1    the program or the run failed (an inferlet raised, a build failed)
  2    bad input: a flag, a missing or unloadable model, a device, a prompt too long
  130  interrupted (Ctrl-C)"""


class HelpFormatter(argparse.HelpFormatter):
    """Fills prose paragraphs to the terminal's width; keeps indented blocks (examples, exit
    codes) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            block
            if "\n  " in block
            else super(HelpFormatter, self)._fill_text(block, width, indent)
            for block in text.split("\n\n")
        )


class UsageError(Exception):
    """Input the command cannot take; the message says what to change. Exits 2."""


# Path problems are the user's input; other OS errors (a full disk) are the run failing.
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def exit_code(error: BaseException) -> int | None:
    """The scheme's code for `error`; None for an error no check expected (a bug)."""
    from pie.engine.errors import EngineError, ModelLoadError
    from pie.runtime.errors import InferletError
    from pie.server.config import ConfigError

    if isinstance(error, (UsageError, ModelLoadError, ConfigError, *_PATH_ERRORS)):
        return EXIT_USAGE
    if isinstance(error, (InferletError, EngineError, OSError)):
        return EXIT_FAILED
    return None


def describe(error: BaseException) -> list[str]:
    """The line (or two) that tells the user what went wrong."""
    from pie.runtime.errors import BuildError, InstanceFailed, last_line

    if isinstance(error, BuildError):
        return [f"build failed: {error}"]
    if isinstance(error, InstanceFailed):  # the message may be the guest's whole traceback
        where = _program_frame(str(error))
        lines = [last_line(error)]
        if where:
            lines.append(f"  at {where} (--verbose shows the inferlet's traceback)")
        return lines
    if isinstance(error, _PATH_ERRORS) and error.filename is not None:
        return [f"{error.filename}: {error.strerror}"]
    if exit_code(error) is None:
        return [
            f"unexpected error: {type(error).__name__}: {error}",
            "  (a bug in pie? --verbose shows the traceback)",
        ]
    return [str(error).strip() or type(error).__name__]


def report(command: str, error: BaseException, verbose: bool = False) -> int:
    """Prints `error` once on stderr (its traceback too when `verbose`); returns the exit code."""
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    first, *rest = describe(error)
    print(f"pie {command}: {first}", *rest, sep="\n", file=sys.stderr, flush=True)
    code = exit_code(error)
    return EXIT_FAILED if code is None else code


def run_handler(args: argparse.Namespace) -> int:
    """Runs the subcommand's handler; any failure ends as one report and its exit code."""
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        # `pie run` reads options after its program inside the handler: look at args now.
        return report(args.command, e, verbose=bool(getattr(args, "verbose", False)))


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _program_frame(text: str) -> str | None:
    """`file:line (function)` of the last frame in the user's own code: a file that exists on
    this host outside the pie package and the Python installation (a guest's bundled SDK and
    stdlib live at paths like /0/pie/sdk that the host lacks)."""
    package = Path(__file__).resolve().parent
    installed = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    found = None
    for file, line, function in _FRAME.findall(text):
        path = Path(file)
        with contextlib.suppress(OSError):
            path = path.resolve()
            inside = [package, *installed]
            if path.is_file() and not any(path.is_relative_to(p) for p in inside):
                found = f"{_shown(path)}:{line} ({function})"
    return found


def _shown(path: Path) -> str:
    """`path` relative to the working directory when under it (as the user typed it)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def checked_device(name: str) -> str:
    """`name` if torch can place tensors there; else a UsageError saying what to use instead.
    A CPU build of torch fails `cuda` only deep in the model load, in a bare AssertionError."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise UsageError(f"--device {name}: Pie runs on cpu or cuda")
    if torch.version.cuda is None:
        raise UsageError(
            f"--device {name}: this torch ({torch.__version__}) is a CPU build; "
            "use --device cpu or install a CUDA build of torch"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UsageError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {name}: only {count} CUDA device(s) here (cuda:0..)")
    return name


@contextlib.contextmanager
def step(description: str, console: Any = None) -> Iterator[None]:
    """A spinner naming `description`, with the seconds spent, while the block runs; shown only
    on a terminal (piped or captured output stays clean) and gone once the block ends."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        progress.add_task(description, total=None)
        yield
