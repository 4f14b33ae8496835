"""PNG plots of a report (matplotlib, headless)."""

from __future__ import annotations

from ._optional import require
from .render import MB, sensitivity_table


def _pyplot():
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg", force=False)  # no display needed; keeps notebooks' own backend if set
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(report, path=None):
    """Linear-layer weight memory vs perplexity change, one labelled point per config."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    full = report.full
    ax.axhline(0, color="grey", lw=1, ls="--")
    points = [(r.linear_bytes / MB, r.ppl_change * 100) for r in report.results]
    span_x = max(x for x, _ in points) - min(x for x, _ in points) or 1.0
    span_y = max(y for _, y in points) - min(y for _, y in points) or 1.0

    def crowded_above(x, y):
        # Another config just above this one (nf4 / nf4-dq, int8 / int8-t0): label below instead.
        return any(0 < py - y < 0.1 * span_y and abs(px - x) < 0.05 * span_x for px, py in points)

    for r in report.results:
        is_mix = report.proposal is not None and r.name == report.proposal.result
        marker, color = ("*", "tab:red") if is_mix else (("s", "black") if r is full else ("o", "tab:blue"))
        x, y = r.linear_bytes / MB, r.ppl_change * 100
        ax.scatter(x, y, marker=marker, s=140 if is_mix else 60, color=color, zorder=3)
        below = crowded_above(x, y)
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(7, -13 if below else 6), fontsize=9)
    if report.proposal is not None:
        ax.axhline(report.proposal.budget * 100, color="tab:red", lw=1, ls=":", label="perplexity budget")
        ax.legend(loc="upper right", fontsize=9)
    ax.set_xlabel("linear-layer weights (MB)")
    ax.set_ylabel(f"perplexity change vs full precision (%)\n(full precision: {full.perplexity:.2f})")
    ax.set_title(f"Size vs perplexity — {report.model}, {report.device}", fontsize=11)
    ax.margins(x=0.12, y=0.15)
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, f"{report.tokens} tokens, context {report.context}; {report.date}", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _finish(plt, fig, path)


def plot_sensitivity(report, path=None, top: int = 20):
    """Per-layer bars for the `top` most costly layers under each config: relative output
    error (left) and the estimated perplexity change were only that layer quantized (right)."""
    plt = _pyplot()
    configs = report.sensitivity_results()
    if not configs:
        raise ValueError("the report has no per-layer errors (it ran with sensitivity=False)")
    names = [row[0] for row in sensitivity_table(report, top)[1]][::-1]  # most costly on top
    by_config = {r.name: {layer.name: layer for layer in r.layers} for r in configs}
    height = 0.8 / len(configs)
    fig, axes = plt.subplots(
        1, 2, sharey=True, figsize=(11, 1.5 + 0.22 * len(names) * max(1.0, len(configs) / 2.5)), dpi=120
    )
    panels = (
        (axes[0], lambda e: e.rel_error, "relative output error (%)"),
        (axes[1], lambda e: e.est_ppl_change, "estimated perplexity change,\nonly this layer quantized (%)"),
    )
    floor = 1e-4  # percent; log axes cannot show zero or a (noise-level) negative estimate
    for ax, value, label in panels:
        for i, r in enumerate(configs):
            ys = [j + (i - (len(configs) - 1) / 2) * height for j in range(len(names))]
            xs = [max(value(by_config[r.name][n]) * 100, floor) if n in by_config[r.name] else 0 for n in names]
            ax.barh(ys, xs, height=height, label=r.name)
        ax.set_xscale("log")
        ax.set_xlabel(label + ", log scale")
        ax.grid(axis="x", alpha=0.3, which="major")
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"Per-layer sensitivity — {report.model}: the {len(names)} most costly layers "
        f"({report.sensitivity_tokens} tokens)",
        fontsize=11,
    )
    fig.tight_layout()
    return _finish(plt, fig, path)


def _finish(plt, fig, path):
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig
