"""Evaluation text, its strided windows, and the default prompts."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PROMPTS = (
    "Explain the accuracy tradeoff in quantization.",
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
)


def default_text() -> str:
    """Real English prose that ships with CPython: the topic pages behind `help()`.

    Topics are joined in sorted order so the text (and every figure measured on it) is
    the same from run to run on a given Python version.
    """
    from pydoc_data.topics import topics  # half a megabyte of text: loaded only when it is used

    return "\n\n".join(topics[key] for key in sorted(topics))


CALIBRATION_SOURCE = "the docstrings of CPython's standard-library modules"


def calibration_text() -> str:
    """What the activation-weighted scale search runs the model on: real English about programming, from
    the docstrings of the standard library's top-level modules, in file-name order (fixed per Python
    version). It shares no text with `default_text`, so it never sees what the report evaluates."""
    import ast
    import glob
    import os
    import sysconfig

    docs = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        try:
            with open(path, encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read()))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc:
            docs.append(doc)
    return "\n\n".join(docs)


@dataclass(frozen=True)
class Window:
    """Model input `tokens[begin:end]`; only its last `scored` positions are evaluated."""

    begin: int
    end: int
    scored: int


def strided_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Cover `n_tokens` with windows of at most `context` tokens, each advancing by `stride`.

    Every position from 1 on is scored exactly once (position 0 has nothing to predict it),
    and every scored position after the first window sees at least `context − stride`
    tokens of history — the usual sliding-window perplexity.
    """
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens of evaluation text, got {n_tokens}")
    if not 0 < stride < context:
        # Windows must overlap: a window's first token has no prediction inside it.
        raise ValueError(f"stride must be in 1..{context - 1} (below the context length), got {stride}")
    windows, scored_until = [], 1
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + context, n_tokens)
        windows.append(Window(begin, end, end - scored_until))
        scored_until = end
        begin += stride
    return windows
