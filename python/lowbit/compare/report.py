"""The comparison report: its data, and its renderings (terminal, DataFrame, JSON, CSV,
Markdown, HTML). Every rendering reads the same `summary_rows()` so they cannot drift apart."""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import os
from dataclasses import dataclass, field

from ._optional import require
from .evaluate import Generation, Speed
from .metrics import Agreement

MB = 1e6


@dataclass
class LayerError:
    name: str
    scheme: str  # int8 / nf4 / fp4
    rel_error: float  # ‖Q(x) − Wx‖ / ‖Wx‖ on full-precision activations
    est_ppl_change: float  # estimated perplexity change were only this layer quantized
    bytes: int  # the quantized layer
    full_bytes: int  # the same layer in full precision


@dataclass
class ConfigResult:
    name: str
    description: str
    config: dict  # the LowbitConfig fields that matter, for JSON
    quantize_seconds: float  # for full precision: the load time
    linear_bytes: int
    total_bytes: int
    linear_ratio: float
    total_ratio: float
    perplexity: float
    ppl_change: float  # relative: perplexity / full − 1
    agreement: Agreement | None  # None for full precision itself
    speed: Speed | None
    generations: list[Generation] = field(default_factory=list)
    layers: list[LayerError] = field(default_factory=list)


@dataclass
class MixProposal:
    """A per-module precision mix proposed to meet a perplexity budget, and its measurement."""

    budget: float  # max relative perplexity increase
    base: str  # the measured config most layers keep
    config: dict  # LowbitConfig fields of the proposed mix, module_overrides included
    promoted: int  # layers moved to higher precision
    predicted_change: float
    result: str | None = None  # name of the measured ConfigResult
    measured_change: float | None = None

    @property
    def overrides(self) -> dict[str, str]:
        return self.config["module_overrides"]

    @property
    def met(self) -> bool | None:
        return None if self.measured_change is None else self.measured_change <= self.budget


@dataclass
class Report:
    model: str
    model_note: str | None
    device: str
    date: str
    versions: dict[str, str]
    text_source: str
    tokens: int  # scored tokens
    context: int
    stride: int
    windows: int
    sensitivity_tokens: int  # scored tokens the per-layer errors were measured on
    results: list[ConfigResult]  # full precision first
    proposal: MixProposal | None = None

    # ---- data views -------------------------------------------------------------------
    @property
    def full(self) -> ConfigResult:
        return self.results[0]

    def __getitem__(self, name: str) -> ConfigResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no config named {name!r}; have {[r.name for r in self.results]}")

    @property
    def setup(self) -> str:
        """One line saying what was measured and how."""
        return (
            f"{self.model} on {self.device}, {self.date}; perplexity over {self.tokens} tokens of "
            f"{self.text_source} in {self.windows} windows of ≤{self.context} tokens (stride {self.stride})"
        )

    def summary_rows(self) -> list[dict]:
        """One dict per config with raw numbers (fractions, bytes, seconds); None where not applicable."""
        rows = []
        for r in self.results:
            a = r.agreement
            rows.append(
                {
                    "config": r.name,
                    "description": r.description,
                    "linear_bytes": r.linear_bytes,
                    "linear_ratio": r.linear_ratio,
                    "total_bytes": r.total_bytes,
                    "total_ratio": r.total_ratio,
                    "quantize_s": r.quantize_seconds if a else None,
                    "perplexity": r.perplexity,
                    "ppl_change": r.ppl_change,
                    "kl_mean": a.kl_mean if a else None,
                    "kl_p99": a.kl_p99 if a else None,
                    "top1": a.top1 if a else None,
                    "top5": a.top5 if a else None,
                    "logits_rel_error": a.logits_rel_error if a else None,
                    "hidden_rel_error": a.hidden_rel_error if a else None,
                    "prefill_ms": r.speed.prefill_ms if r.speed else None,
                    "decode_ms_per_token": r.speed.decode_ms_per_token if r.speed else None,
                }
            )
        return rows

    def sensitivity_rows(self) -> list[dict]:
        return [
            {"config": r.name, **dataclasses.asdict(layer)} for r in self.results for layer in r.layers
        ]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"summary": self.summary_rows()}

    def to_json(self, path=None, indent=2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)
        if path is not None:
            _write(path, text)
        return text

    def to_csv(self, path=None, sensitivity=False) -> str:
        """The summary table (or, with `sensitivity=True`, one row per config × layer) as CSV."""
        rows = self.sensitivity_rows() if sensitivity else self.summary_rows()
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        if path is not None:
            _write(path, buffer.getvalue())
        return buffer.getvalue()

    def to_dataframe(self, sensitivity=False):
        """A pandas DataFrame of the summary (or of the per-layer errors), one row per config."""
        pd = require("pandas", "DataFrames")
        frame = pd.DataFrame(self.sensitivity_rows() if sensitivity else self.summary_rows())
        return frame if sensitivity else frame.set_index("config")

    # ---- formatted tables -------------------------------------------------------------
    def display_table(self) -> tuple[list[str], list[list[str]]]:
        """Header and formatted cells of the summary table, shared by every text rendering."""
        header = [
            "config", "linear MB (×fp)", "model MB (×fp)", "quant s", "perplexity (Δ)", "KL mean",
            "KL p99", "top-1", "top-5", "logits err", "hidden err", "prefill ms", "decode ms/tok",
        ]  # fmt: skip
        cells = []
        for row in self.summary_rows():
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
                    _fmt(row["prefill_ms"], "{:.1f}"),
                    _fmt(row["decode_ms_per_token"], "{:.1f}"),
                ]
            )
        return header, cells

    def sensitivity_results(self) -> list[ConfigResult]:
        """Configs with per-layer errors, less the proposed mix (its layers are a subset of its base's)."""
        mix = self.proposal.result if self.proposal else None
        return [r for r in self.results if r.layers and r.name != mix]

    def sensitivity_table(self, top: int = 10) -> tuple[list[str], list[list[str]]]:
        """The `top` layers with the largest estimated cost under any config; each cell is
        'relative output error / estimated perplexity change were only this layer quantized'."""
        quantized = self.sensitivity_results()
        by_layer: dict[str, dict[str, LayerError]] = {}
        for r in quantized:
            for layer in r.layers:
                by_layer.setdefault(layer.name, {})[r.name] = layer
        worst = sorted(by_layer, key=lambda n: max(e.est_ppl_change for e in by_layer[n].values()), reverse=True)
        header = ["layer"] + [r.name for r in quantized]
        cells = []
        for name in worst[:top]:
            row = [name]
            for r in quantized:
                e = by_layer[name].get(r.name)
                row.append("—" if e is None else f"{e.rel_error:.1%} / {e.est_ppl_change:+.2%}")
            cells.append(row)
        return header, cells

    def proposal_lines(self) -> list[str]:
        p = self.proposal
        if p is None:
            return []
        lines = [
            f"Budget: perplexity +{p.budget:.2%} at most. Proposed: {p.base} with {p.promoted} "
            f"layer(s) in higher precision, predicted {p.predicted_change:+.2%}.",
        ]
        lines += [f"  {pattern!r}: {scheme}" for pattern, scheme in p.overrides.items()]
        if p.measured_change is not None:
            verdict = "MET" if p.met else "MISSED"
            result = self[p.result]
            lines.append(
                f"Measured ({p.result}): {p.measured_change:+.2%} → budget {verdict}; linear weights "
                f"{result.linear_bytes / MB:.1f} MB (×{result.linear_ratio:.2f} of full precision)."
            )
        return lines

    def generation_blocks(self) -> list[tuple[str, list[tuple[str, Generation]]]]:
        """Per prompt: (prompt, [(config name, generation)]) with full precision first."""
        blocks = []
        for i, gen in enumerate(self.full.generations):
            blocks.append((gen.prompt, [(r.name, r.generations[i]) for r in self.results if r.generations]))
        return blocks

    # ---- renderings -------------------------------------------------------------------
    def to_markdown(self, path=None, top_layers: int = 10) -> str:
        out = ["# lowbit compare", "", self.setup + ".", ""]
        if self.model_note:
            out += [f"Note: {self.model_note}.", ""]
        out += _md_table(*self.display_table()) + [""]
        out += [_COLUMN_NOTES, ""]
        if any(r.layers for r in self.results):
            out += [f"## Most sensitive layers (top {top_layers})", "", _SENSITIVITY_NOTE.format(self.sensitivity_tokens), ""]
            out += _md_table(*self.sensitivity_table(top_layers)) + [""]
        if self.proposal:
            out += ["## Mixed precision", ""] + [line.strip() + "  " for line in self.proposal_lines()] + [""]
        blocks = self.generation_blocks()
        if blocks:
            out += ["## Greedy generations", "", "`⟦` marks the first token that differs from full precision.", ""]
            for prompt, gens in blocks:
                out += [f"**{prompt}**", ""]
                out += [f"- *{name}*: {_marked(g, '⟦')}".replace("\n", " ") for name, g in gens] + [""]
        text = "\n".join(out)
        if path is not None:
            _write(path, text)
        return text

    def _repr_html_(self) -> str:
        def table(header, cells):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
            return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

        parts = [f"<p>{html.escape(self.setup)}</p>"]
        if self.model_note:
            parts.append(f"<p><i>Note: {html.escape(self.model_note)}.</i></p>")
        parts.append(table(*self.display_table()))
        if any(r.layers for r in self.results):
            note = html.escape(_SENSITIVITY_NOTE.format(self.sensitivity_tokens))
            parts += [f"<p><b>Most sensitive layers</b><br>{note}</p>", table(*self.sensitivity_table())]
        if self.proposal:
            parts.append("<p><b>Mixed precision</b><br>" + "<br>".join(map(html.escape, self.proposal_lines())) + "</p>")
        for prompt, gens in self.generation_blocks():
            rows = "".join(
                f"<tr><td>{html.escape(name)}</td><td>{_marked(g, html_mark=True)}</td></tr>" for name, g in gens
            )
            parts.append(f"<p><b>{html.escape(prompt)}</b></p><table>{rows}</table>")
        return "\n".join(parts)

    def __rich__(self):
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

        parts = [Text(self.setup, style="bold")]
        if self.model_note:
            parts.append(Text(f"Note: {self.model_note}.", style="italic"))
        # The summary is split in two so each half fits an 80-column terminal.
        header, cells = self.display_table()
        parts.append(table("Memory and speed", header, cells, [0, 1, 2, 3, 11, 12]))
        parts.append(table("Accuracy against full precision", header, cells, [0, 4, 5, 6, 7, 8, 9, 10]))
        parts.append(Text(_COLUMN_NOTES, style="dim"))
        if any(r.layers for r in self.results):
            header, cells = self.sensitivity_table()
            parts.append(table("Most sensitive layers (err / Δppl)", header, cells, range(len(header))))
            parts.append(Text(_SENSITIVITY_NOTE.format(self.sensitivity_tokens), style="dim"))
        if self.proposal:
            parts.append(Text("Mixed precision\n" + "\n".join(self.proposal_lines())))
        for prompt, gens in self.generation_blocks():
            block = Text(f"\n{prompt}\n", style="bold")
            for name, g in gens:
                split = len(g.text) if g.diverges_at_char is None else g.diverges_at_char
                block.append(f"  {name:>10}: ", style="cyan")
                block.append(g.text[:split].replace("\n", " "))
                block.append(g.text[split:].replace("\n", " "), style="red")
                block.append("\n")
            parts.append(block)
        return Group(*parts)

    def print(self, file=None) -> None:
        """Render to the terminal (stdout unless `file` is given) with rich."""
        console = require("rich.console", "the terminal table").Console(file=file)
        if not console.is_terminal:  # a file or pipe has no width to respect: avoid wrapping cells
            console.width = 160
        console.print(self)

    # ---- plots and files --------------------------------------------------------------
    def plot_tradeoff(self, path=None):
        from .plots import plot_tradeoff

        return plot_tradeoff(self, path)

    def plot_sensitivity(self, path=None, top: int = 20):
        from .plots import plot_sensitivity

        return plot_sensitivity(self, path, top)

    def save(self, directory) -> dict[str, str]:
        """Write report.md, report.json, summary.csv, sensitivity.csv and both plots; return their paths."""
        os.makedirs(directory, exist_ok=True)
        paths = {
            name: os.path.join(directory, name)
            for name in ("report.md", "report.json", "summary.csv", "sensitivity.csv", "tradeoff.png", "sensitivity.png")
        }
        self.to_markdown(paths["report.md"])
        self.to_json(paths["report.json"])
        self.to_csv(paths["summary.csv"])
        self.to_csv(paths["sensitivity.csv"], sensitivity=True)
        self.plot_tradeoff(paths["tradeoff.png"])
        self.plot_sensitivity(paths["sensitivity.png"])
        return paths


_COLUMN_NOTES = (
    "linear = the linear layers quantization shrinks; model = all weights. "
    "KL = KL(full ‖ quantized) per next-token distribution, nats. top-1 = same argmax as full precision; "
    "top-5 = overlap of the top-5 sets. err = ‖quantized − full‖ / ‖full‖ of final logits / last hidden state. "
    "prefill/decode: median wall time on the device above."
)


_SENSITIVITY_NOTE = (
    "Each cell: err / Δppl. err = each layer's relative output error, fed full-precision activations ({} tokens); "
    "Δppl = its gradient-weighted (Fisher) estimate of the perplexity change were only that layer quantized."
)


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
