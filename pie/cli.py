"""The `pie` command line: generate with the engine, and (runtime) build and run inferlets.

Every subcommand ends through `cli_errors.run_handler`: one exit-code scheme, a failure told
once (`--verbose` adds the traceback).
"""

from __future__ import annotations

import argparse
import mmap
import platform
import re
import sys
import time
from importlib import metadata, util
from pathlib import Path
from typing import Any

from pie.cli_errors import (
    EXIT_CODES_HELP,
    HelpFormatter,
    UsageError,
    checked_device,
    run_handler,
    step,
)
from pie.engine.hf_export_cli import add_export_command
from pie.runtime.cli_commands import add_model_options, add_runtime_commands
from pie.server.cli import add_serve_command

EXAMPLES = """examples:
  pie run inferlets/text_completion.py -- "What is the capital of France?"
  pie run --native inferlets/text_completion.py -- "Hi"   # plain Python: breakpoints work
  pie build inferlets/text_completion.py -o text_completion.wasm
  pie generate "Why is the sky blue?" --max-tokens 64
  pie serve --port 8080
  pie export-hf smollm2-hf/"""


def _generate(args: argparse.Namespace) -> int:
    if args.raw and not args.prompt:
        raise UsageError("the prompt is empty (--raw sends the text as it is: give some)")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    device = checked_device(args.device)
    from pie.engine.engine import Engine, dtype_named
    from pie.engine.generate import generate
    from pie.engine.request import Greedy, Sample
    from pie.engine.tokenizer import StreamDecoder

    dtype = dtype_named(args.dtype)
    started = time.perf_counter()
    with step(f"loading {args.model or 'the embedded SmolLM2'} on {device}"):
        engine = Engine.load(args.model, device=device, dtype=dtype, num_pages=args.kv_pages)
    loaded = time.perf_counter()
    tok = engine.tokenizer
    text = args.prompt
    if not args.raw:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    prompt = tok.encode(text)
    max_tokens = fitted_max_tokens(len(prompt), args.max_tokens, engine.max_position)
    sampler = (
        Greedy()
        if args.temperature == 0
        else Sample(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
    )
    stream = StreamDecoder(tok)
    stops = tok.stop_token_ids
    first_token_at: list[float] = []  # the first token ends the prefill

    def show(_: int, token: int) -> None:
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        if token not in stops:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

    began = time.perf_counter()
    (out,) = generate(engine, [prompt], max_tokens, sampler, stops, on_token=show)
    ended = time.perf_counter()
    sys.stdout.write(stream.flush() + "\n")
    prefilled = first_token_at[0] if first_token_at else ended
    # The first new token comes out of the prefill's forward: decode makes the rest.
    prefill = _per_second(len(prompt), prefilled - began)
    decode = _per_second(len(out) - 1, ended - prefilled)
    print(
        f"[{engine.model_name} {str(engine.dtype).removeprefix('torch.')} on {engine.device}: "
        f"loaded in {loaded - started:.1f} s; {len(prompt)} prompt tokens, prefill in "
        f"{prefilled - began:.2f} s ({prefill}); {len(out)} new tokens, decode in "
        f"{ended - prefilled:.2f} s ({decode})]",
        file=sys.stderr,
    )
    return 0


def fitted_max_tokens(prompt_tokens: int, max_tokens: int, context: int) -> int:
    """How many tokens to generate: `max_tokens`, cut to what the model's context leaves. A prompt
    that leaves no room is refused here, before any forward pass computes a token of it."""
    if prompt_tokens == 0:
        raise UsageError("the prompt is empty: it encodes to no tokens")
    if prompt_tokens >= context:
        raise UsageError(
            f"the prompt is {prompt_tokens:,} tokens, the model's context is {context:,}: "
            "shorten the prompt"
        )
    return min(max_tokens, context - prompt_tokens)


def _per_second(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f} tok/s" if tokens > 0 and seconds > 0 else "- tok/s"


def guest_python() -> str:
    """The CPython version inferlets run in: the one componentize-py bundles, read from the name
    of the libpython inside its native module (`libpython3.14.so`); "unknown" if not found."""
    spec = util.find_spec("componentize_py")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for native in sorted(Path(folder).glob("componentize_py*")):
            if not native.is_file():
                continue
            with open(native, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                found = re.search(rb"libpython(3\.\d+)", m)  # type: ignore[call-overload]
                if found:
                    return bytes(found.group(1)).decode()
    return "unknown"


def version_text() -> str:
    """`pie --version`: the package, the host's Python, and the guest's (they differ)."""
    try:
        componentize = metadata.version("componentize-py")
    except metadata.PackageNotFoundError:
        componentize = "not installed"
    host = f"{platform.python_implementation()} {platform.python_version()}"
    return (
        f"pie {metadata.version('pie-python')}\n"
        f"host Python: {host} ({sys.executable}): the engine, the runtime, `pie run --native`\n"
        f"guest Python: CPython {guest_python()} (componentize-py {componentize}): "
        "inferlets built into wasm"
    )


class _VersionAction(argparse.Action):
    """Prints `version_text()` and exits; computed only when asked (it reads the toolchain)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pie",
        description="Pie for Python: programmable LLM serving. Inferlets (Python programs "
        "built into WebAssembly) run sandboxed next to a PyTorch engine.",
        epilog=f"{EXAMPLES}\n\n{EXIT_CODES_HELP}",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the version and the host and guest Pythons"
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="`pie COMMAND --help` for more"
    )
    add_runtime_commands(sub)
    gen = sub.add_parser(
        "generate",
        help="chat completion straight from the engine, no runtime (a baseline)",
        description="Answer one prompt with the engine alone: no inferlet, no runtime. "
        "Prints the text, then load time and prefill and decode rates on stderr.",
        epilog='examples:\n  pie generate "Why is the sky blue?"\n'
        '  pie generate --raw "Once upon a time" --max-tokens 32 --temperature 0.8 --seed 1',
        formatter_class=HelpFormatter,
    )
    gen.add_argument("prompt", help="the user's message (with --raw: the text to continue)")
    add_model_options(gen)
    gen.add_argument(
        "--max-tokens",
        type=int,
        default=128,
        help="most tokens to generate (cut to what the context leaves; default 128)",
    )
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy; else sample"
    )
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    gen.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    gen.add_argument("--system", default=None, help="a system message before the prompt")
    gen.add_argument("--raw", action="store_true", help="no chat template: continue the text")
    gen.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of errors")
    gen.set_defaults(handler=_generate)
    add_serve_command(sub)
    add_export_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [w for w in argv if not w.startswith("-")]
    if words[:1] == ["run"] and "--" in argv:
        # What follows `--` is the inferlet's, cut here: argparse drops a `--` right after
        # `pie run PROGRAM` and would then read the inferlet's `--flags` as pie's.
        cut = argv.index("--")
        args = build_parser().parse_args(argv[:cut])
        args.inferlet_args = argv[cut + 1 :]
        return run_handler(args)
    return run_handler(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
