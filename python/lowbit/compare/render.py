"""Renderings of a :class:`~.report.Report`: terminal, Markdown, HTML, JSON, CSV and DataFrame.

The text renderings share the formatted tables below, and every rendering reads the
report's `summary_rows()`, so they cannot drift apart.
"""

from __future__ import annotations

import csv
import html
import io
import json
from typing import TYPE_CHECKING

from ._optional import require
from .evaluate import Generation

if TYPE_CHECKING:  # report.py imports this module for its methods, so only type checkers import it back
    from .report import LayerError, Report

# Timed runs of one config further apart than this (relative to their median) make the report warn.
TIMING_SPREAD_LIMIT = 0.25
# Fewest measured layers over which the note states the estimate's rank correlation with the measurements.
MIN_RANKED_LAYERS = 10

MB = 1e6  # sizes are shown in decimal megabytes

_COLUMN_NOTES = (
    "linear = the linear layers quantization shrinks; model = all weights. "
    "KL = KL(full ‖ quantized) per next-token distribution, nats. top-1 = same argmax as full precision; "
    "top-5 = overlap of the top-5 sets. err = ‖quantized − full‖ / ‖full‖ of final logits / last hidden state. "
    "prefill/decode: median wall time on the device above, ± the spread of its runs ((slowest − fastest) / median)."
)

_SENSITIVITY_NOTE = (
    "Each cell: err / Δppl est [/ measured]. err = each layer's relative output error, fed full-precision "
    "activations ({} tokens); Δppl est = the first-order estimate (Σ gradient · output error) of the perplexity "
    "change were only that layer quantized; measured = that change measured, only that layer quantized and "
    "every other in full precision, on the same tokens (for each config's {} layers of largest estimated effect)."
)


# ---- formatted tables -----------------------------------------------------------------
def display_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the summary table, shared by every text rendering."""
    header = [
        "config", "linear MB (×fp)", "model MB (×fp)", "quant s", "perplexity (Δ)", "KL mean",
        "KL p99", "top-1", "top-5", "logits err", "hidden err", "prefill ms", "decode ms/tok",
    ]  # fmt: skip
    cells = []
    for row in report.summary_rows():
        cells.append(
            [
                row["config"],
                f"{row['linear_bytes'] / MB:.1f} (×{row['linear_ratio']:.2f})",
                f"{row['total_bytes'] / MB:.1f} (×{row['total_ratio']:.2f})",
                _fmt(row["quantize_s"], "{:.2f}"),
                f"{row['perplexity']:.3f} ({row['ppl_change']:+.2%})",
                _fmt(row["kl_mean"], "{:.4f}"),
                _fmt(row["kl_p99"], "{:.4f}"),
                _fmt(row["top1"], "{:.1%}"),
                _fmt(row["top5"], "{:.1%}"),
                _fmt(row["logits_rel_error"], "{:.2%}"),
                _fmt(row["hidden_rel_error"], "{:.2%}"),
                _timing(row["prefill_ms"], row["prefill_spread"]),
                _timing(row["decode_ms_per_token"], row["decode_spread"]),
            ]
        )
    return header, cells


def _sensitivity_note(report: Report) -> str:
    measured = max((sum(e.measured_ppl_change is not None for e in r.layers) for r in report.sensitivity_results()),
                   default=0)  # fmt: skip
    note = _SENSITIVITY_NOTE.format(report.sensitivity_tokens, measured)
    agreement = {name: (rho, n) for name, (rho, n) in report.estimate_agreement().items() if n >= MIN_RANKED_LAYERS}
    if agreement:
        note += " Rank correlation (Spearman) of estimate and measurement over those layers: " + ", ".join(
            f"{name} {_fmt(rho, '{:+.2f}')} (n={n})" for name, (rho, n) in agreement.items()) + "."
    elif measured:
        note += (f" {measured} measured layers per config are too few for a rank correlation to mean much (over all"
                 " 210 layers of the built-in model it is 0.95 for NF4, 0.87 for FP4: benchmarks/sensitivity_study.py).")
    note += " A negative change means that layer's rounding alone happened to lower perplexity on this text."
    return note


def sensitivity_table(report: Report, top: int = 10) -> tuple[list[str], list[list[str]]]:
    """The `top` layers with the largest cost under any config (measured where measured, else estimated);
    each cell is 'relative output error / estimated perplexity change [/ measured change]'."""
    quantized = report.sensitivity_results()
    by_layer: dict[str, dict[str, LayerError]] = {}
    for r in quantized:
        for layer in r.layers:
            by_layer.setdefault(layer.name, {})[r.name] = layer
    worst = sorted(by_layer, key=lambda n: max(e.ppl_change for e in by_layer[n].values()), reverse=True)
    header = ["layer"] + [r.name for r in quantized]
    cells = []
    for name in worst[:top]:
        row = [name]
        for r in quantized:
            e = by_layer[name].get(r.name)
            measured = "" if e is None or e.measured_ppl_change is None else f" / {e.measured_ppl_change:+.2%}"
            row.append("—" if e is None else f"{e.rel_error:.1%} / {e.est_ppl_change:+.2%}{measured}")
        cells.append(row)
    return header, cells


def _timing(ms, spread) -> str:
    if ms is None:
        return "—"
    return f"{ms:.1f}" if not spread else f"{ms:.1f} ±{spread / 2:.0%}"


def timing_warning(report: Report) -> str | None:
    """A warning when timed runs of some config disagreed: the machine was busy and the speeds are not reliable."""
    names = report.timing_disagreements()
    if not names:
        return None
    return (f"Warning: the timed runs of {', '.join(names)} differed by more than {TIMING_SPREAD_LIMIT:.0%} "
            "between fastest and slowest: the machine was busy, so the prefill/decode columns may be off by as much. "
            "Rerun on a quiet machine to compare speeds.")  # fmt: skip


def advice_line(report: Report) -> str | None:
    """One line: the smallest measured config within common perplexity budgets."""
    parts = []
    for budgets, r in report.advice():
        what = f"{r.name} ({r.linear_bytes / MB:.1f} MB linear, ×{r.linear_ratio:.2f}; perplexity {r.ppl_change:+.2%})"
        if budgets:
            parts.append(f"within {', '.join(f'+{b:.1%}'.replace('.0%', '%') for b in budgets)}: {what}")
        else:
            parts.append(f"smallest measured: {what}")
    return "What to use: " + "; ".join(parts) + "." if parts else None


def proposal_lines(report: Report) -> list[str]:
    """The mixed-precision proposal, its overrides and its measured verdict, one line each."""
    p = report.proposal
    if p is None:
        return []
    if not p.promoted:
        return [f"Budget: perplexity +{p.budget:.2%} at most. {p.base} meets it as it is "
                f"({p.measured_change:+.2%}), and no mix of the measured configs is predicted to be smaller."]  # fmt: skip
    lines = [
        f"Budget: perplexity +{p.budget:.2%} at most. Proposed: {p.base} with {p.promoted} "
        f"layer(s) in {p.high}, predicted {p.predicted_change:+.2%}.",
    ]
    lines += [f"  {pattern!r}: {scheme}" for pattern, scheme in p.overrides.items()]
    if p.measured_change is not None:
        verdict = "MET" if p.met else "MISSED"
        result = report[p.result]
        lines.append(
            f"Measured ({p.result}): {p.measured_change:+.2%} → budget {verdict}; linear weights "
            f"{result.linear_bytes / MB:.1f} MB (×{result.linear_ratio:.2f} of full precision)."
        )
    return lines


def _headline(report: Report) -> list[str]:
    """What every rendering says right under the summary: a timing warning, if any, and what to use."""
    return [line for line in (timing_warning(report), advice_line(report)) if line]


# ---- text renderings ------------------------------------------------------------------
def to_text(report: Report) -> str:
    """A plain-text summary (what `repr(report)` shows in a REPL): the setup, the summary table and the headline."""
    header, cells = display_table(report)
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = [f"lowbit compare: {report.setup}."]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
              for values in [header, *cells]]  # fmt: skip
    lines += _headline(report) + proposal_lines(report)
    lines.append("(report.print() for every table, report.save(dir) for files, report.to_dataframe() for data)")
    return "\n".join(lines)


def to_markdown(report: Report, path=None, top_layers: int = 10) -> str:
    out = ["# lowbit compare", "", report.setup + ".", ""]
    if report.model_note:
        out += [f"Note: {report.model_note}.", ""]
    out += _md_table(*display_table(report)) + [""]
    out += [_COLUMN_NOTES, ""]
    headline = _headline(report)
    out += [*headline, ""] if headline else []
    if any(r.layers for r in report.results):
        out += [f"## Most sensitive layers (top {top_layers})", "", _sensitivity_note(report), ""]
        out += _md_table(*sensitivity_table(report, top_layers)) + [""]
    if report.proposal:
        out += ["## Mixed precision", ""] + [line.strip() + "  " for line in proposal_lines(report)] + [""]
    blocks = report.generation_blocks()
    if blocks:
        out += ["## Greedy generations", "", "`⟦` marks the first token that differs from full precision.", ""]
        for prompt, gens in blocks:
            out += [f"**{prompt}**", ""]
            out += [f"- *{name}*: {_marked(g, '⟦')}".replace("\n", " ") for name, g in gens] + [""]
    text = "\n".join(out)
    if path is not None:
        _write(path, text)
    return text


def to_html(report: Report) -> str:
    def table(header, cells):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [f"<p>{html.escape(report.setup)}</p>"]
    if report.model_note:
        parts.append(f"<p><i>Note: {html.escape(report.model_note)}.</i></p>")
    parts.append(table(*display_table(report)))
    parts += [f"<p><b>{html.escape(line)}</b></p>" for line in _headline(report)]
    if any(r.layers for r in report.results):
        note = html.escape(_sensitivity_note(report))
        parts += [f"<p><b>Most sensitive layers</b><br>{note}</p>", table(*sensitivity_table(report))]
    if report.proposal:
        parts.append("<p><b>Mixed precision</b><br>" + "<br>".join(map(html.escape, proposal_lines(report))) + "</p>")
    for prompt, gens in report.generation_blocks():
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td style='white-space: pre-wrap; text-align: left'>"
            f"{_marked(g, html_mark=True)}</td></tr>"
            for name, g in gens
        )
        parts.append(f"<p><b>{html.escape(prompt)}</b></p><table>{rows}</table>")
    return "\n".join(parts)


def to_rich(report: Report):
    """The report as a rich renderable (a Group of tables and text)."""
    rich_table = require("rich.table", "the terminal table")
    from rich.console import Group
    from rich.text import Text

    def table(title, header, cells, columns):
        t = rich_table.Table(title=title, title_justify="left", header_style="bold")
        for i in columns:
            t.add_column(header[i], justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in cells:
            t.add_row(*(row[i] for i in columns))
        return t

    parts = [Text(report.setup, style="bold")]
    if report.model_note:
        parts.append(Text(f"Note: {report.model_note}.", style="italic"))
    # The summary is split in two so each half fits an 80-column terminal.
    header, cells = display_table(report)
    parts.append(table("Memory and speed", header, cells, [0, 1, 2, 3, 11, 12]))
    parts.append(table("Accuracy against full precision", header, cells, [0, 4, 5, 6, 7, 8, 9, 10]))
    parts.append(Text(_COLUMN_NOTES, style="dim"))
    parts += [Text(line, style="bold yellow" if line.startswith("Warning") else "bold") for line in _headline(report)]
    if any(r.layers for r in report.results):
        header, cells = sensitivity_table(report)
        parts.append(table("Most sensitive layers (err / Δppl est / measured)", header, cells, range(len(header))))
        parts.append(Text(_sensitivity_note(report), style="dim"))
    if report.proposal:
        parts.append(Text("Mixed precision\n" + "\n".join(proposal_lines(report))))
    for prompt, gens in report.generation_blocks():
        block = Text(f"\n{prompt}\n", style="bold")
        for name, g in gens:
            split = len(g.text) if g.diverges_at_char is None else g.diverges_at_char
            block.append(f"  {name:>10}: ", style="cyan")
            block.append(g.text[:split].replace("\n", " "))
            block.append(g.text[split:].replace("\n", " "), style="red")
            block.append("\n")
        parts.append(block)
    return Group(*parts)


def print_report(report: Report, file=None) -> None:
    console = require("rich.console", "the terminal table").Console(file=file)
    if not console.is_terminal:  # a file or pipe has no width to respect: avoid wrapping cells
        console.width = 160
    console.print(to_rich(report))


# ---- data renderings ------------------------------------------------------------------
def to_json(report: Report, path=None, indent=2) -> str:
    text = json.dumps(report.to_dict(), indent=indent, ensure_ascii=False)
    if path is not None:
        _write(path, text)
    return text


def to_csv(report: Report, path=None, sensitivity=False) -> str:
    rows = report.sensitivity_rows() if sensitivity else report.summary_rows()
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    if path is not None:
        _write(path, buffer.getvalue())
    return buffer.getvalue()


def to_dataframe(report: Report, sensitivity=False):
    pd = require("pandas", "DataFrames")
    frame = pd.DataFrame(report.sensitivity_rows() if sensitivity else report.summary_rows())
    return frame if sensitivity else frame.set_index("config")


def _fmt(value, spec: str) -> str:
    return "—" if value is None else spec.format(value)


def _md_table(header, cells) -> list[str]:
    def row(values):
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    return [row(header), "|" + "---|" * len(header)] + [row(r) for r in cells]


def _marked(g: Generation, marker: str = "", html_mark: bool = False) -> str:
    """The generation with its diverging part marked (by `marker`, or <mark> in HTML)."""
    split = len(g.text) if g.diverges_at_char is None else g.diverges_at_char
    head, tail = g.text[:split], g.text[split:]
    if html_mark:
        return html.escape(head) + (f"<mark>{html.escape(tail)}</mark>" if tail else "")
    return head + (marker + tail if g.diverges_at_char is not None else "")


def _write(path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
