"""`pie build` and `pie run`: build an inferlet, or run one on a local model in-process.

`pie run file.py -- args` builds the file if needed (cached by content hash), loads the model,
starts the runtime, streams what the inferlet sends to the terminal and prints its result.
`--native` runs the same file as plain Python against the same host implementation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pie.cli_errors import HelpFormatter, UsageError, checked_device, step
from pie.runtime.limits import InstanceLimits

RUN_EXAMPLES = """examples:
  pie run inferlets/text_completion.py -- "What is the capital of France?"
  pie run inferlets/text_completion.py --model llama.gguf --device cuda -- "Hi"
  pie run --native inferlets/text_completion.py -- "Hi"   # plain Python: breakpoints work
  pie run program.wasm --server http://host:8080 --token T -- args"""


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The engine's options, the same in `pie run` and `pie generate` (`pie serve` has them too,
    defaulting from its config file)."""
    parser.add_argument(
        "--model", default=None, help="GGUF file or HF folder (default: the embedded SmolLM2-135M)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="weights and KV cache (default auto: the fastest for the device)",
    )
    parser.add_argument(
        "--kv-pages",
        type=int,
        default=None,
        help="KV-cache pages of 16 tokens (default: sized to memory and the model's context)",
    )


def add_runtime_commands(subparsers: Any) -> None:
    """Adds `build` and `run` to the `pie` command's subparsers."""
    build = subparsers.add_parser(
        "build",
        help="compile an inferlet (.py or .js) to a WebAssembly component",
        description="Build an inferlet into a wasm component (cached by content hash; "
        "`pie run` builds on its own, this writes the .wasm for `pie run X.wasm` or a server).",
        epilog="example:\n  pie build inferlets/text_completion.py -o text_completion.wasm",
        formatter_class=HelpFormatter,
    )
    build.add_argument("source", help="the inferlet (.py; .js is built with componentize-js)")
    build.add_argument(
        "-o", "--output", default=None, help="where to write the .wasm (default: beside source)"
    )
    build.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of errors")
    build.set_defaults(handler=_build)

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--native", action="store_true", help="run as plain Python, no sandbox")
    add_model_options(options)
    options.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes for wasm instances (default: one per CPU; 0: in this process)",
    )
    options.add_argument(
        "--memory-mb", type=int, default=None, help="guest linear memory limit (default 512)"
    )
    options.add_argument("--cpu-seconds", type=float, default=60.0, help="guest CPU-time limit")
    options.add_argument("--wall-seconds", type=float, default=3600.0, help="wall-time limit")
    options.add_argument(
        "--verbose", "-v", action="store_true", help="log the runtime's work; error tracebacks"
    )
    options.add_argument(
        "--snapshot-dir",
        default=None,
        help="keep named KV snapshots (Context.save) in this folder across runs",
    )
    options.add_argument(
        "--mcp",
        action="append",
        default=[],
        metavar="NAME=URL_OR_COMMAND",
        help="an MCP server the inferlet may use (pie.sdk.mcp): a streamable-HTTP URL or a "
        "stdio command line; repeatable",
    )
    options.add_argument("--server", default=None, help="run on a `pie serve` at this URL")
    options.add_argument("--token", default=None, help="the server's token (or $PIE_TOKEN)")
    run = subparsers.add_parser(
        "run",
        parents=[options],
        help="run an inferlet (.py, .js or .wasm) on a local model, or on a server",
        description="Run an inferlet: build it if needed, load the model, stream what the "
        "inferlet sends to stdout (stdin lines go to it), print its result.",
        epilog=RUN_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    run.add_argument("program", help="the inferlet: a .py or .js file (built if needed) or a .wasm")
    # Options may also follow the program; everything after `--` goes to the inferlet.
    run.add_argument("rest", nargs=argparse.REMAINDER, help="[options] [-- inferlet arguments]")
    run.set_defaults(handler=lambda args: _run(_split_rest(args, options, run)))


def _build(args: argparse.Namespace) -> int:
    from pie.runtime.build import build_inferlet

    source = Path(args.source)
    if not source.is_file():
        raise UsageError(f"no such file: {source}")
    _check_js_tools(source)
    started = time.perf_counter()
    with step(f"building {source}"):
        out = build_inferlet(source, args.output or source.with_suffix(".wasm"))
    print(f"built {out} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _check_js_tools(program: Path, native: bool = False) -> None:
    """A .js inferlet is built by componentize-js (Node.js) and runs sandboxed only."""
    if program.suffix != ".js":
        return
    from pie.runtime.build_js import missing_tools

    problem = missing_tools()
    if problem:
        raise UsageError(problem)
    if native:
        raise UsageError("--native runs Python inferlets in-process; a .js one runs as wasm only")


def _split_rest(
    args: argparse.Namespace, options: argparse.ArgumentParser, run: argparse.ArgumentParser
) -> argparse.Namespace:
    """Options after the program apply to `pie run`; words and whatever follows `--` are the
    inferlet's arguments."""
    rest = list(args.rest)
    cut = rest.index("--") if "--" in rest else len(rest)
    _, words = options.parse_known_args(rest[:cut], namespace=args)
    unknown = [w for w in words if w.startswith("-")]
    if unknown:
        run.error(f"unrecognized arguments: {' '.join(unknown)} (inferlet arguments go after --)")
    args.args = words + rest[cut + 1 :] + getattr(args, "inferlet_args", [])
    return args


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # Guest stdout/stderr reach the log tagged with the instance id: show them.
    logging.getLogger("pie.inferlet").setLevel(logging.INFO)
    if not args.verbose:  # the failure is printed once, by the command, not also as a log line
        for handler in logging.getLogger().handlers:
            handler.addFilter(_drop_failure_note)
    program = Path(args.program)
    if not program.is_file():
        raise UsageError(f"no such file: {program}")
    _check_js_tools(program, args.native)
    if args.server and args.snapshot_dir:
        raise UsageError("--snapshot-dir is the server's to set (pie serve --snapshot-dir)")
    if args.server and args.mcp:
        raise UsageError("--mcp is for local runs: a server grants those its config names")
    if args.server:
        from pie.client.run import run_remote

        return run_remote(args, program)
    if program.suffix == ".py":  # a syntax error shows at once, not after the model loads
        from pie.runtime.build import check_syntax

        check_syntax(program)
    elif program.suffix == ".js":
        from pie.runtime.build_js import check_syntax as check_js_syntax

        check_js_syntax(program)
    elif program.suffix == ".wasm":  # so does a file that is no WebAssembly at all
        with program.open("rb") as f:
            if f.read(4) != b"\0asm":
                raise UsageError(f"{program} is not a WebAssembly component (no \\0asm header)")
    checked_device(args.device)
    return _run_program(args, program)


def mcp_grants(flags: list[str]) -> tuple[tuple[str, str], ...]:
    """`--mcp NAME=URL_OR_COMMAND` flags as the (name, target) pairs an instance is granted."""
    from pie.runtime.host.mcp import grant

    grants = []
    for flag in flags:
        name, _, target = flag.partition("=")
        try:
            grants.append(grant(name.strip(), target))
        except ValueError as e:
            raise UsageError(f"--mcp {flag}: {e} (write NAME=URL_OR_COMMAND)") from None
    return tuple(grants)


def _drop_failure_note(record: logging.LogRecord) -> bool:
    """The runtime notes each instance's end (`failed: ...`) on its log; `pie run` reports it."""
    return not (record.name.startswith("pie.inferlet.") and record.msg == "failed: %s")


def _run_program(args: argparse.Namespace, program: Path) -> int:
    from pie.control.snapshots import SnapshotSettings
    from pie.engine.engine import Engine, dtype_named
    from pie.runtime.errors import InstanceFailed
    from pie.runtime.runtime import Runtime
    from pie.runtime.session import QueueSession

    if args.native and args.memory_mb is not None:
        # Native code shares this process's heap: no limit can hold it (docs/api.md).
        print("pie run: --memory-mb cannot apply with --native (no sandbox)", file=sys.stderr)
        return 2
    if program.suffix in (".py", ".js") and not args.native:  # a build error: before the load
        from pie.runtime.build import build_inferlet

        with step(f"building {program} (cached once built)"):
            build_inferlet(program)
    dtype = dtype_named(args.dtype)
    started = time.perf_counter()
    with step(f"loading {args.model or 'the embedded SmolLM2'} on {args.device}"):
        engine = Engine.load(args.model, device=args.device, dtype=dtype, num_pages=args.kv_pages)
    loaded = time.perf_counter()
    limits = InstanceLimits(
        memory_bytes=(args.memory_mb or MEMORY_MB) * 2**20,
        cpu_seconds=args.cpu_seconds,
        wall_seconds=args.wall_seconds,
        mcp_servers=mcp_grants(args.mcp),
    )
    workers = 0 if args.native else args.workers  # native runs stay in this process anyway
    preparing = contextlib.ExitStack()  # a spinner until the program is ready to launch
    preparing.enter_context(step("starting the runtime, loading the program"))
    snapshots = SnapshotSettings(directory=args.snapshot_dir)
    with preparing, Runtime(engine, limits=limits, workers=workers, snapshots=snapshots) as runtime:
        if program.suffix == ".wasm":
            if args.native:
                print("pie run: --native needs the .py source, not a .wasm", file=sys.stderr)
                return 2
            digest = runtime.add_component(program)
        else:
            digest = runtime.add_source(program, native=args.native)
        ready = time.perf_counter()
        preparing.close()
        stream = _TerminalStream()
        session = QueueSession(on_text=stream.write, on_first_receive=lambda: _feed_stdin(session))
        instance = runtime.launch(digest, args.args, session=session, native=args.native)
        try:
            result = instance.wait()
        except KeyboardInterrupt:
            return _interrupted(instance, stream)
        except InstanceFailed:
            stream.end_line()
            raise  # cli_errors reports it: its last line, where in the program, exit 1
        finally:
            elapsed = time.perf_counter() - ready
        if result and not stream.wrote(result):
            stream.end_line()
            print(result)
        else:
            stream.end_line(force=True)
        stats = runtime.scheduler.stats
        mode = "native" if args.native else "wasm"
        print(
            f"[{engine.model_name}, {mode}: model loaded in {loaded - started:.1f} s, program ready "
            f"in {ready - loaded:.1f} s, ran in {elapsed:.2f} s; {stats.tokens} tokens in "
            f"{stats.steps} engine steps]",
            file=sys.stderr,
        )
    return 0


MEMORY_MB = 512  # --memory-mb's default (with --native the flag is refused: no sandbox)
STOP_GRACE_S = 1.0  # how long Ctrl-C waits for the program to end before leaving without it


def _interrupted(instance: Any, stream: _TerminalStream) -> int:
    """Ctrl-C: stops the program (a wait wakes at once, computing stops at its next check,
    in wasm and natively) and ends with one line; a program that does not stop within
    STOP_GRACE_S (native code swallowing the stop) is left behind: the process exits."""
    instance.cancel("interrupted (Ctrl-C)")
    stopped = True
    try:
        instance.done.exception(STOP_GRACE_S)
    except (TimeoutError, KeyboardInterrupt):
        stopped = False
    stream.end_line()
    if not stopped:
        print("pie run: interrupted (Ctrl-C); the program did not stop, exiting", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    print("pie run: interrupted (Ctrl-C)", file=sys.stderr)
    return 130


class _TerminalStream:
    """Writes streamed text to stdout as it arrives; remembers whether a line is open, and a
    digest of what it wrote (a result equal to the stream is not printed twice; the text
    itself is not kept, however much a program sends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open_line = False
        self._digest = hashlib.sha256()
        self._length = 0

    def write(self, instance_id: int, text: str) -> None:
        with self._lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            data = text.encode("utf-8", "surrogatepass")
            self._digest.update(data)
            self._length += len(data)
            if text:
                self._open_line = not text.endswith("\n")

    def wrote(self, text: str) -> bool:
        """Whether `text` is exactly what was streamed."""
        data = text.encode("utf-8", "surrogatepass")
        with self._lock:
            return len(data) == self._length and hashlib.sha256(data).digest() == (
                self._digest.digest()
            )

    def end_line(self, force: bool = False) -> None:
        with self._lock:
            if self._open_line or force:
                sys.stdout.write("\n")
                sys.stdout.flush()
            self._open_line = False


def _feed_stdin(session: Any) -> None:
    """Lines typed on stdin become the client's messages (started on the first receive); the
    end of stdin closes the session's input, so `receive` raises `EndOfInput` in the program
    instead of waiting until the wall-time limit."""

    def pump() -> None:
        try:
            for line in sys.stdin:
                session.put_text(line.rstrip("\n"))
        except (OSError, ValueError):  # stdin closed or unreadable: that is its end too
            pass
        session.close_input()

    threading.Thread(target=pump, name="pie-stdin", daemon=True).start()
