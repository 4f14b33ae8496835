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
    """Per-layer bars for the `top` most costly layers under each config: relative output error (left, log scale:
    always positive) and, right, the perplexity change were only that layer quantized, signed: the first-order
    estimate as a bar, the measurement (each config's costliest few) as a black diamond on it."""
    plt = _pyplot()
    configs = report.sensitivity_results()
    if not configs:
        raise ValueError("the report has no per-layer errors (it ran with sensitivity=False)")
    names = [row[0] for row in sensitivity_table(report, top)[1]][::-1]  # most costly on top
    by_config = {r.name: {layer.name: layer for layer in r.layers} for r in configs}
    height = 0.8 / len(configs)
    fig, axes = plt.subplots(
        1, 2, sharey=True, figsize=(11, 2.2 + 0.22 * len(names) * max(1.0, len(configs) / 2.5)), dpi=120
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    measured_shown = False
    for i, r in enumerate(configs):
        color = colors[i % len(colors)]
        ys = [j + (i - (len(configs) - 1) / 2) * height for j in range(len(names))]
        layers = [by_config[r.name].get(n) for n in names]
        axes[0].barh(ys, [e.rel_error * 100 if e else 0 for e in layers], height=height, color=color, label=r.name)
        axes[1].barh(ys, [e.est_ppl_change * 100 if e else 0 for e in layers], height=height, color=color, alpha=0.55)
        measured = [(e.measured_ppl_change * 100, y) for e, y in zip(layers, ys) if e and e.measured_ppl_change is not None]
        if measured:
            axes[1].scatter([m for m, _ in measured], [y for _, y in measured], marker="D", s=18, color="black",
                            zorder=3, label=None if measured_shown else "measured (only that layer quantized)")  # fmt: skip
            measured_shown = True
    axes[0].set_xscale("log")
    axes[0].set_xlabel("relative output error (%), log scale")
    # Signed: a symmetric log scale, linear within ±0.01%, so small, large and negative costs all show.
    axes[1].set_xscale("symlog", linthresh=0.01)
    axes[1].axvline(0, color="grey", lw=1)
    axes[1].margins(x=0.08)  # room for a measurement beyond every bar
    axes[1].set_xlabel("perplexity change, only this layer quantized (%):\nbars estimated (first order), diamonds measured")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3, which="major")
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    handles = [*axes[0].get_legend_handles_labels()[0], *axes[1].get_legend_handles_labels()[0]]
    labels = [*axes[0].get_legend_handles_labels()[1], *axes[1].get_legend_handles_labels()[1]]
    # The legend sits under the panels, where it cannot cover a bar.
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle(
        f"Per-layer sensitivity — {report.model}: the {len(names)} most costly layers "
        f"({report.sensitivity_tokens} tokens)",
        fontsize=11,
    )
    fig.text(0.01, 0.065, "A negative change: that layer's rounding alone happened to lower perplexity on this text "
             "(a first-order estimate is least reliable near zero).", fontsize=7, color="grey")  # fmt: skip
    fig.tight_layout(rect=(0, 0.09 + 0.02 * (len(labels) // 5), 1, 1))
    return _finish(plt, fig, path)


def _finish(plt, fig, path):
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig
