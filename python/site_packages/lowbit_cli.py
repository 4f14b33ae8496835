"""The `lowbit` command's front: answers --help and --version in a fraction of a second, without importing torch
(importing lowbit takes seconds), and hands every command to `lowbit.cli`."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

# Each command and what it does: the front's help and lowbit.cli's subcommands read this one table.
COMMANDS = {
    "compare": "measure quantization configs against full precision (default: the built-in SmolLM2)",
    "export-model": "write a model (default: the built-in SmolLM2, from its GGUF) as a transformers model directory",
}

USAGE = "usage: lowbit [-h] [--version] COMMAND ..."


def version() -> str:
    """'lowbit X (torch Y, CUDA kernels: …)' from the installed metadata and build_info.json, importing nothing."""
    text = f"lowbit {importlib.metadata.version('lowbit')}"
    spec = importlib.util.find_spec("lowbit")
    for directory in (spec.submodule_search_locations or []) if spec else []:
        info_path = Path(directory) / "build_info.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            cuda = (info.get("cuda_archs") or "none") if info.get("cuda") else "none"
            text += f" (built against torch {info.get('torch')}; CUDA kernels: {cuda})"
            break
    return text


def short_help() -> str:
    lines = [USAGE, "", "8-bit and 4-bit quantized linear layers for PyTorch.", "", "commands:"]
    lines += [f"  {name:<14}{summary}" for name, summary in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help    show this help message and exit", "  --version     show lowbit's version and build",
              "", "`lowbit COMMAND --help` for a command's options."]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(short_help())
        return 0
    if argv[0] == "--version":
        print(version())
        return 0
    if argv[0] not in COMMANDS:
        print(f"{USAGE}\nlowbit: error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    from lowbit.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
