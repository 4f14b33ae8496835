"""PNG plots of a report (matplotlib, headless)."""

from __future__ import annotations

from ._optional import require

MB = 1e6


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
    for r in report.results:
        is_mix = report.proposal is not None and r.name == report.proposal.result
        marker, color = ("*", "tab:red") if is_mix else (("s", "black") if r is full else ("o", "tab:blue"))
        x, y = r.linear_bytes / MB, r.ppl_change * 100
        ax.scatter(x, y, marker=marker, s=140 if is_mix else 60, color=color, zorder=3)
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
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
    """Horizontal bars: relative output error of the `top` most sensitive layers under each config."""
    plt = _pyplot()
    configs = [r for r in report.results if r.layers]
    if not configs:
        raise ValueError("the report has no per-layer errors (it ran with sensitivity=False)")
    errors = {r.name: {layer.name: layer.rel_error for layer in r.layers} for r in configs}
    names = [row[0] for row in report.sensitivity_table(top)[1]][::-1]  # most sensitive on top
    height = 0.8 / len(configs)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(names) * max(1, len(configs) / 2.5)), dpi=120)
    for i, r in enumerate(configs):
        ys = [j + (i - (len(configs) - 1) / 2) * height for j in range(len(names))]
        ax.barh(ys, [errors[r.name].get(n, 0) * 100 for n in names], height=height, label=r.name)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("relative output error on evaluation activations (%, log scale)")
    ax.set_title(f"Per-layer sensitivity — {report.model} (top {len(names)} layers)", fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    return _finish(plt, fig, path)


def _finish(plt, fig, path):
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig
