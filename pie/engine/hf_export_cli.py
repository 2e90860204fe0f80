"""`pie export-hf [GGUF] OUT_DIR`: the command line of `pie.engine.hf_export` (imported lazily,
so `pie` starts without torch)."""

from __future__ import annotations

from typing import Any

from pie.cli_errors import HelpFormatter


def add_export_command(sub: Any) -> None:
    """Adds `export-hf` to the `pie` command line's subparsers."""
    cmd = sub.add_parser(
        "export-hf",
        help="write a GGUF model as an HF folder (transformers, lm-eval, aiperf)",
        description="Write a GGUF model as an HF folder: config.json, model.safetensors, "
        "tokenizer.json, the chat template and the stop ids.",
        epilog="examples:\n  pie export-hf smollm2-hf/\n  pie export-hf model.gguf out/ "
        "--dtype bfloat16",
        formatter_class=HelpFormatter,
    )
    cmd.add_argument("model", nargs="?", default=None, help="GGUF file (default: embedded model)")
    cmd.add_argument("out_dir", help="folder to write (created if missing)")
    cmd.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="of the written weights (default float32)",
    )
    cmd.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of errors")
    cmd.set_defaults(handler=_export_command)


def _export_command(args: Any) -> int:
    import torch

    from pie.engine.hf_export import FILES, export_hf

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    out = export_hf(args.model, args.out_dir, dtype)
    print(f"wrote {', '.join(FILES)} to {out}")
    return 0
