"""Helpers for your own pytest accuracy checks on a quantized model.

    from lowbit import LowbitConfig
    from lowbit.testing import assert_within_budget

    def test_nf4_keeps_quality():
        assert_within_budget("path/to/model", LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                             text=open("eval.txt").read(), max_ppl_increase=0.02, min_top1=0.9)
"""

from __future__ import annotations

from .compare.api import compare
from .compare.presets import describe
from .compare.report import ConfigResult

# Smaller than the report's defaults: a test should take seconds, not minutes.
DEFAULT_TOKENS = 512
DEFAULT_CONTEXT = 256
DEFAULT_STRIDE = 128


def measure(
    model, config, text=None, *, tokenizer=None, device=None,
    max_tokens=DEFAULT_TOKENS, context=DEFAULT_CONTEXT, stride=DEFAULT_STRIDE,
) -> ConfigResult:  # fmt: skip
    """Perplexity change and next-token agreement of `config` against full precision.

    `model` is a path or a loaded causal LM (with `tokenizer`); `text` defaults to CPython's
    pydoc_data topics. No generations, timing or per-layer errors: only what a budget checks.
    """
    report = compare(
        model, {describe(config): config}, text, prompts=[], device=device, tokenizer=tokenizer,
        max_tokens=max_tokens, context=context, stride=stride,
        sensitivity=False, timing=False, progress=False,
    )  # fmt: skip
    return report.results[1]


def assert_within_budget(
    model, config, text=None, *, max_ppl_increase: float | None = 0.01, min_top1: float | None = None,
    min_top5: float | None = None, max_kl: float | None = None, **measure_kwargs,
) -> ConfigResult:  # fmt: skip
    """Fail with every measured figure against its budget unless all budgets hold.

    max_ppl_increase: relative perplexity increase allowed (0.01 = 1%).
    min_top1 / min_top5: fraction of positions whose top-1 token / top-5 set agree with full precision.
    max_kl: mean KL(full ‖ quantized) per position, in nats.
    Returns the measured :class:`ConfigResult` so a test can check more.
    """
    result = measure(model, config, text, **measure_kwargs)
    a = result.agreement
    checks = [
        # (label, measured, limit, comparison, format)
        ("perplexity change", result.ppl_change, max_ppl_increase, "≤", "{:+.2%}"),
        ("top-1 agreement", a.top1, min_top1, "≥", "{:.2%}"),
        ("top-5 overlap", a.top5, min_top5, "≥", "{:.2%}"),
        ("mean KL (nats)", a.kl_mean, max_kl, "≤", "{:.4f}"),
    ]
    lines, failed = [], False
    for label, value, limit, op, fmt in checks:
        if limit is None:
            lines.append(f"  {label:<18} {fmt.format(value):>9}   (no budget)")
            continue
        ok = value <= limit if op == "≤" else value >= limit
        failed |= not ok
        verdict = "ok" if ok else "FAIL"
        lines.append(f"  {label:<18} {fmt.format(value):>9}   budget {op} {fmt.format(limit):>9}   {verdict}")
    if failed:
        raise AssertionError(
            f"{result.name} is outside its accuracy budget ({a.positions} positions, "
            f"perplexity {result.perplexity:.3f}):\n" + "\n".join(lines)
        )
    return result
