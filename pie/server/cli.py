"""`pie serve`: load the model (with a progress display), start the runtime and the server,
serve until SIGINT/SIGTERM, drain, exit 0 (1 if KV pages leaked: the last line says)."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import sys
import time
from typing import Any

from pie.cli_errors import HelpFormatter, checked_device
from pie.server.config import ServerConfig

log = logging.getLogger("pie.server")
TOKEN_ENV = "PIE_SERVE_TOKEN"  # a token kept off the command line (other users can read argv)


def add_serve_command(subparsers: Any) -> None:
    """Adds `serve` to the `pie` command's subparsers."""
    serve = subparsers.add_parser(
        "serve",
        help="serve inferlets over the network (WebSocket protocol, OpenAI API, metrics)",
        description="Serve the model on one port: the OpenAI API under /v1, the WebSocket "
        "client protocol at /ws, /metrics, /health and a web page at /. SIGINT/SIGTERM drain "
        "running inferlets, then exit (1 if KV pages leaked).",
        epilog="examples:\n  pie serve --port 8080\n  pie serve --config pie.toml --host 0.0.0.0 "
        "--token $SECRET\n\nflags win over the config file; settings left out keep its values",
        formatter_class=HelpFormatter,
    )
    serve.add_argument("--config", default=None, help="a TOML file of settings (flags win)")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8080; 0: any free)")
    serve.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
    serve.add_argument("--device", default=None, help="cpu (default) or cuda")
    serve.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16"],
        help="weights and KV cache (default auto: the fastest for the device)",
    )
    serve.add_argument(
        "--kv-pages", type=int, default=None, help="KV pages in the pool (default: sized to memory)"
    )
    serve.add_argument("--workers", type=int, default=None, help="instance worker processes")
    serve.add_argument(
        "--max-instances", type=int, default=None, help="most inferlets running at once"
    )
    serve.add_argument(
        "--token", default=None, help=f"bearer token clients must present (or ${TOKEN_ENV})"
    )
    serve.add_argument(
        "--drain-grace",
        type=float,
        default=None,
        dest="drain_grace_s",
        help="seconds a stop waits for running inferlets before cancelling them",
    )
    serve.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="what the server logs (default info)",
    )
    serve.add_argument(
        "--no-prefix-cache",
        action="store_false",
        default=None,
        dest="prefix_cache",
        help="do not keep KV pages for reuse by later prompts with the same prefix",
    )
    serve.add_argument(
        "--snapshot-dir",
        default=None,
        help="keep named KV snapshots (Context.save) in this folder across restarts",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of errors")
    serve.set_defaults(handler=_serve)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    flags = {
        name: getattr(args, name)
        for name in (
            "host",
            "port",
            "model",
            "device",
            "dtype",
            "kv_pages",
            "workers",
            "max_instances",
            "token",
            "drain_grace_s",
            "log_level",
            "prefix_cache",
            "snapshot_dir",
        )
    }
    if flags["token"] is None and os.environ.get(TOKEN_ENV):
        flags["token"] = os.environ[TOKEN_ENV]
    return ServerConfig.from_toml(args.config, **flags)


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # a ConfigError ends the command: exit 2 (cli_errors)
    checked_device(config.device)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from pie.server.lifecycle import bind_socket

    try:  # before the model loads: a taken port fails in a second, not after the load
        sock = bind_socket(config.host, config.port)
    except OSError as e:
        print(f"pie serve: cannot listen on {config.host}:{config.port}: {e}", file=sys.stderr)
        return 1
    state, app = _start(config)
    return _run(state, app, sock)


def _start(config: ServerConfig) -> tuple[Any, Any]:
    """Model, runtime, app (which registers the built-in inferlets), with a progress display."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from pie.server.app import create_app
    from pie.server.state import ServerState

    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        stage = progress.add_task(f"loading model {config.model or '(embedded SmolLM2)'}")
        engine = _load_engine(config)
        progress.update(stage, description=f"loaded {engine.model_name}", completed=1, total=1)
        stage = progress.add_task("starting the runtime")
        runtime = _make_runtime(engine, config)
        progress.update(stage, completed=1, total=1)
        stage = progress.add_task("building the built-in inferlets")
        state = ServerState(runtime=runtime, engine=engine, config=config)
        app = create_app(state)
        progress.update(stage, completed=1, total=1)
    return state, app


def _load_engine(config: ServerConfig) -> Any:
    from pie.engine.engine import Engine, dtype_named

    dtype = dtype_named(config.dtype)
    return Engine.load(config.model, device=config.device, dtype=dtype, num_pages=config.kv_pages)


def _make_runtime(engine: Any, config: ServerConfig) -> Any:
    from pie.runtime.runtime import Runtime

    kwargs: dict[str, Any] = {
        "limits": config.instance_limits(),
        "max_batch_tokens": config.max_batch_tokens,
        "max_instances": config.max_instances,
        "decode_latency_factor": config.decode_latency_factor or None,
        "kv_share": config.kv_share,
        "prefix_cache": config.prefix_cache,
        "snapshots": config.snapshot_settings(),
    }
    if config.workers is not None:
        if "workers" not in inspect.signature(Runtime).parameters:
            log.warning("this runtime runs instances in-process; --workers is ignored")
        else:
            kwargs["workers"] = config.workers
    return Runtime(engine, **kwargs)


def _run(state: Any, app: Any, sock: Any) -> int:
    from pie.server.lifecycle import pool_report, serve

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"pie serve: listening on http://{shown}:{port} (WebSocket: ws://{shown}:{port}/ws)",
        file=sys.stderr,
        flush=True,
    )
    began = time.monotonic()
    try:
        asyncio.run(serve(state, app, sock))
    finally:
        state.runtime.close()
    whole, words = pool_report(state.runtime)
    print(
        f"pie serve: stopped after {time.monotonic() - began:.1f} s; {words}",
        file=sys.stderr,
        flush=True,
    )
    return 0 if whole else 1
