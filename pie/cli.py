"""The `pie` command line: generate with the engine, and (runtime) build and run inferlets."""

from __future__ import annotations

import argparse
import sys
import time

from pie.engine.hf_export_cli import add_export_command
from pie.runtime.cli_commands import add_runtime_commands
from pie.server.cli import add_serve_command


def _generate(args: argparse.Namespace) -> int:
    import torch

    from pie.engine.engine import Engine
    from pie.engine.generate import generate
    from pie.engine.request import Greedy, Sample
    from pie.engine.tokenizer import StreamDecoder

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    started = time.perf_counter()
    engine = Engine.load(args.model, device=args.device, dtype=dtype, num_pages=args.kv_pages)
    loaded = time.perf_counter()
    tok = engine.tokenizer
    text = args.prompt
    if not args.raw:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    prompt = tok.encode(text)
    sampler = (
        Greedy()
        if args.temperature == 0
        else Sample(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
    )
    stream = StreamDecoder(tok)
    stops = tok.stop_token_ids

    def show(_: int, token: int) -> None:
        if token not in stops:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

    (out,) = generate(engine, [prompt], args.max_tokens, sampler, stops, on_token=show)
    sys.stdout.write(stream.flush() + "\n")
    elapsed = time.perf_counter() - loaded
    print(
        f"[{engine.model_name} {str(engine.dtype).removeprefix('torch.')} on {engine.device}: "
        f"loaded in {loaded - started:.1f} s, {len(prompt)} prompt + {len(out)} new tokens "
        f"in {elapsed:.2f} s, {len(out) / elapsed:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pie", description="Pie for Python: programmable LLM serving"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="chat completion straight from the engine")
    gen.add_argument("prompt")
    gen.add_argument(
        "--model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2)"
    )
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--system", default=None, help="system message")
    gen.add_argument("--raw", action="store_true", help="no chat template: continue the text")
    gen.add_argument("--kv-pages", type=int, default=256)
    gen.set_defaults(handler=_generate)
    add_runtime_commands(sub)
    add_serve_command(sub)
    add_export_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
