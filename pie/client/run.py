"""`pie run FILE --server URL`: build locally, upload (skipped when the server has the hash),
launch, stream the instance's messages to stdout and stdin lines to it, print the result.
Exit codes as the local `pie run`: 0 done, 1 failed, 2 bad input, 130 interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pie.client.connection import PieClient
from pie.client.errors import InstanceError, PieClientError

TOKEN_ENV = "PIE_TOKEN"


def run_remote(args: argparse.Namespace, program: Path) -> int:
    """Runs `program` on the server at `args.server`; returns the exit code."""
    if args.native:
        print("pie run: --native runs in-process; it cannot be used with --server", file=sys.stderr)
        return 2
    if program.suffix == ".wasm":
        wasm = program.read_bytes()
    else:
        from pie.runtime.build import build_inferlet
        from pie.runtime.errors import BuildError

        try:
            wasm = build_inferlet(program).read_bytes()
        except BuildError as e:
            print(f"pie run: build failed: {e}", file=sys.stderr)
            return 1
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        return asyncio.run(_run(args.server, token, wasm, program.stem, list(args.args)))
    except KeyboardInterrupt:
        return 130
    except (PieClientError, OSError) as e:
        print(f"pie run: {args.server}: {e}", file=sys.stderr)
        return 1


async def _run(url: str, token: str | None, wasm: bytes, name: str, argv: list[str]) -> int:
    async with PieClient.connect(url, token=token) as client:
        digest = await client.upload(wasm, name=name)
        instance = await client.launch(digest, argv)
        _feed_stdin(asyncio.get_running_loop(), instance.send, instance.close_input)
        streamed: list[str] = []
        open_line = False
        try:
            async for event in instance.events():
                if event.kind == "message":
                    text = event.text or ""
                    streamed.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    open_line = bool(text) and not text.endswith("\n")
                elif event.kind in ("stdout", "stderr") and event.instance == instance.id:
                    print(f"[{event.kind}] {event.text}", file=sys.stderr)
                elif event.kind in ("stdout", "stderr"):
                    print(f"[{event.instance} {event.kind}] {event.text}", file=sys.stderr)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await instance.terminate()
            raise
        if open_line or not streamed:
            sys.stdout.write("\n")
        try:
            result = await instance.wait()
        except InstanceError as e:
            print(f"pie run: {e}", file=sys.stderr)
            return 1
        if result and result != "".join(streamed):
            print(result)
        return 0


def _feed_stdin(
    loop: asyncio.AbstractEventLoop,
    send: Callable[[str], Coroutine[Any, Any, None]],
    close: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Lines typed on stdin become messages to the instance; its end closes the instance's
    input (`close_input`), so the program's `receive` raises `EndOfInput`. Each goes after
    the one before was answered: the end never overtakes a line."""
    if sys.stdin is None or sys.stdin.closed:
        return

    def forward(coroutine: Coroutine[Any, Any, None]) -> bool:
        if loop.is_closed():  # the instance ended and the client with it
            coroutine.close()
            return False
        try:
            done = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError:  # closed between the check and the call
            coroutine.close()
            return False
        try:
            done.result()
        except Exception:  # the instance ended meanwhile (or its input closed): stop feeding
            return False
        return True

    def pump() -> None:
        try:
            for line in sys.stdin:
                if not forward(send(line.rstrip("\n"))):
                    return
        except (OSError, ValueError):  # stdin closed or unreadable: that is its end too
            pass
        forward(close())

    threading.Thread(target=pump, name="pie-stdin", daemon=True).start()
