"""`pie build` and `pie run`: build an inferlet, or run one on a local model in-process.

`pie run file.py -- args` builds the file if needed (cached by content hash), loads the model,
starts the runtime, streams what the inferlet sends to the terminal and prints its result.
`--native` runs the same file as plain Python against the same host implementation.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pie.runtime.errors import BuildError, InferletError, InstanceFailed
from pie.runtime.limits import InstanceLimits


def add_runtime_commands(subparsers: Any) -> None:
    """Adds `build` and `run` to the `pie` command's subparsers."""
    build = subparsers.add_parser("build", help="build a Python inferlet into a wasm component")
    build.add_argument("source", help="the inferlet (.py)")
    build.add_argument("-o", "--output", default=None, help="where to write the .wasm")
    build.set_defaults(handler=_build)

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--native", action="store_true", help="run as plain Python, no sandbox")
    options.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
    options.add_argument("--device", default="cpu")
    options.add_argument("--kv-pages", type=int, default=1024)
    options.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes for wasm instances (default: one per CPU; 0: in this process)",
    )
    options.add_argument("--memory-mb", type=int, default=512, help="guest linear memory limit")
    options.add_argument("--cpu-seconds", type=float, default=60.0, help="guest CPU-time limit")
    options.add_argument("--wall-seconds", type=float, default=3600.0, help="wall-time limit")
    options.add_argument("--verbose", "-v", action="store_true", help="log the runtime's work")
    options.add_argument("--server", default=None, help="run on a `pie serve` at this URL")
    options.add_argument("--token", default=None, help="the server's token (or $PIE_TOKEN)")
    run = subparsers.add_parser(
        "run",
        parents=[options],
        help="run an inferlet (.py or .wasm) on a local model",
        description="Run an inferlet: pie run inferlets/text_completion.py -- 'Hello!'",
    )
    run.add_argument("program", help="the inferlet: a .py file (built if needed) or a .wasm")
    # Options may also follow the program; everything after `--` goes to the inferlet.
    run.add_argument("rest", nargs=argparse.REMAINDER, help="[options] [-- inferlet arguments]")
    run.set_defaults(handler=lambda args: _run(_split_rest(args, options, run)))


def _build(args: argparse.Namespace) -> int:
    from pie.runtime.build import build_inferlet

    started = time.perf_counter()
    try:
        out = build_inferlet(args.source, args.output or Path(args.source).with_suffix(".wasm"))
    except BuildError as e:
        print(f"pie build: {e}", file=sys.stderr)
        return 1
    print(f"built {out} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


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
    args.args = words + rest[cut + 1 :]
    return args


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # Guest stdout/stderr reach the log tagged with the instance id: show them.
    logging.getLogger("pie.inferlet").setLevel(logging.INFO)
    program = Path(args.program)
    if not program.is_file():
        print(f"pie run: no such file: {program}", file=sys.stderr)
        return 2
    if args.server:
        from pie.client.run import run_remote

        return run_remote(args, program)
    try:
        return _run_program(args, program)
    except BuildError as e:
        print(f"pie run: build failed: {e}", file=sys.stderr)
        return 1
    except InferletError as e:
        print(f"pie run: {e}", file=sys.stderr)
        return 1


def _run_program(args: argparse.Namespace, program: Path) -> int:
    from pie.engine.engine import Engine
    from pie.runtime.runtime import Runtime
    from pie.runtime.session import QueueSession

    started = time.perf_counter()
    engine = Engine.load(args.model, device=args.device, num_pages=args.kv_pages)
    loaded = time.perf_counter()
    limits = InstanceLimits(
        memory_bytes=args.memory_mb * 2**20,
        cpu_seconds=args.cpu_seconds,
        wall_seconds=args.wall_seconds,
    )
    workers = 0 if args.native else args.workers  # native runs stay in this process anyway
    with Runtime(engine, limits=limits, workers=workers) as runtime:
        if program.suffix == ".wasm":
            if args.native:
                print("pie run: --native needs the .py source, not a .wasm", file=sys.stderr)
                return 2
            digest = runtime.add_component(program)
        else:
            digest = runtime.add_source(program, native=args.native)
        ready = time.perf_counter()
        stream = _TerminalStream()
        session = QueueSession(on_text=stream.write, on_first_receive=lambda: _feed_stdin(session))
        instance = runtime.launch(digest, args.args, session=session, native=args.native)
        try:
            result = instance.wait()
        except KeyboardInterrupt:
            instance.cancel("interrupted (Ctrl-C)")
            instance.done.exception(10)
            return 130
        except InstanceFailed as e:
            stream.end_line()
            print(f"pie run: {e}", file=sys.stderr)
            return 1
        finally:
            elapsed = time.perf_counter() - ready
        streamed = session.text_of(instance.id)
        if result and result != streamed:
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


class _TerminalStream:
    """Writes streamed text to stdout as it arrives; remembers whether a line is open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open_line = False

    def write(self, instance_id: int, text: str) -> None:
        with self._lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            if text:
                self._open_line = not text.endswith("\n")

    def end_line(self, force: bool = False) -> None:
        with self._lock:
            if self._open_line or force:
                sys.stdout.write("\n")
                sys.stdout.flush()
            self._open_line = False


def _feed_stdin(session: Any) -> None:
    """Lines typed on stdin become the client's messages (started on the first receive)."""

    def pump() -> None:
        for line in sys.stdin:
            session.put_text(line.rstrip("\n"))

    threading.Thread(target=pump, name="pie-stdin", daemon=True).start()
