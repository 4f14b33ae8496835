"""The comparison report's data: one `ConfigResult` per measured config, and the views every
rendering reads. The renderings themselves are in `render.py` and `plots.py`; the `Report`
methods that produce them delegate there."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from . import plots, render
from .evaluate import Generation, Speed
from .metrics import Agreement, rank_correlation


# The perplexity budgets the report's "what to use" line answers for.
ADVICE_BUDGETS = (0.005, 0.01, 0.02, 0.05)


@dataclass
class LayerError:
    name: str
    scheme: str  # int8 / nf4 / fp4
    rel_error: float  # ‖Q(x) − Wx‖ / ‖Wx‖ on full-precision activations
    est_ppl_change: float  # first-order estimate of the perplexity change were only this layer quantized
    bytes: int  # the quantized layer
    full_bytes: int  # the same layer in full precision
    # Measured: only this layer quantized, every other in full precision (for a config's costliest few by estimate).
    measured_ppl_change: float | None = None

    @property
    def ppl_change(self) -> float:
        """What holds up best: the measured change where there is one, else the estimate."""
        return self.est_ppl_change if self.measured_ppl_change is None else self.measured_ppl_change


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
    high: str | None = None  # what promoted layers become: a measured config's name, or "full precision"
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
    calibration: str | None = None  # what the activation-weighted scale search ran on, when a config used it

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
            + (f"; scale search calibrated on {self.calibration}" if self.calibration else "")
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
                    "prefill_spread": r.speed.prefill_spread if r.speed else None,
                    "decode_ms_per_token": r.speed.decode_ms_per_token if r.speed else None,
                    "decode_spread": r.speed.decode_spread if r.speed else None,
                }
            )
        return rows

    def sensitivity_rows(self) -> list[dict]:
        return [
            {"config": r.name, **dataclasses.asdict(layer)} for r in self.results for layer in r.layers
        ]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"summary": self.summary_rows()}

    def sensitivity_results(self) -> list[ConfigResult]:
        """Configs with per-layer errors, less a proposed mix (its layers are a subset of its base's). A proposal
        that promotes nothing is a measured config, which keeps its place."""
        mix = self.proposal.result if self.proposal and self.proposal.promoted else None
        return [r for r in self.results if r.layers and r.name != mix]

    def advice(self, budgets=ADVICE_BUDGETS) -> list[tuple[list[float], ConfigResult]]:
        """What to use: for each perplexity budget, the measured config with the fewest linear bytes within it (the
        smaller change on a tie), budgets with the same answer grouped; then the smallest config overall when it
        is none of those, with an empty budget list."""
        quantized = [r for r in self.results[1:] if r.agreement is not None]
        smallest = min(quantized, key=lambda r: (r.linear_bytes, r.ppl_change), default=None)
        grouped: list[tuple[list[float], ConfigResult]] = []
        for budget in budgets:
            within = [r for r in quantized if r.ppl_change <= budget]
            if not within:
                continue
            best = min(within, key=lambda r: (r.linear_bytes, r.ppl_change))
            if grouped and grouped[-1][1] is best:
                grouped[-1][0].append(budget)
            else:
                grouped.append(([budget], best))
        if smallest is not None and all(r is not smallest for _, r in grouped):
            grouped.append(([], smallest))
        return grouped

    def timing_disagreements(self, limit: float = render.TIMING_SPREAD_LIMIT) -> list[str]:
        """Configs whose timed runs disagreed by more than `limit` (relative spread of prefill or decode)."""
        return [r.name for r in self.results
                if r.speed and max(r.speed.prefill_spread, r.speed.decode_spread) > limit]  # fmt: skip

    def estimate_agreement(self) -> dict[str, tuple[float | None, int]]:
        """Per config with measured layers: (Spearman rank correlation of the estimated and the measured
        perplexity change of its measured layers, how many layers that is)."""
        agreement = {}
        for r in self.sensitivity_results():
            measured = [layer for layer in r.layers if layer.measured_ppl_change is not None]
            if measured:
                agreement[r.name] = (
                    rank_correlation([e.est_ppl_change for e in measured], [e.measured_ppl_change for e in measured]),
                    len(measured),
                )
        return agreement

    def generation_blocks(self) -> list[tuple[str, list[tuple[str, Generation]]]]:
        """Per prompt: (prompt, [(config name, generation)]) with full precision first."""
        blocks = []
        for i, gen in enumerate(self.full.generations):
            blocks.append((gen.prompt, [(r.name, r.generations[i]) for r in self.results if r.generations]))
        return blocks

    # ---- renderings, in render.py and plots.py ----------------------------------------
    def display_table(self) -> tuple[list[str], list[list[str]]]:
        return render.display_table(self)

    def sensitivity_table(self, top: int = 10) -> tuple[list[str], list[list[str]]]:
        return render.sensitivity_table(self, top)

    def proposal_lines(self) -> list[str]:
        return render.proposal_lines(self)

    def to_markdown(self, path=None, top_layers: int = 10) -> str:
        return render.to_markdown(self, path, top_layers)

    def _repr_html_(self) -> str:
        return render.to_html(self)

    def __repr__(self) -> str:
        # A REPL shows the summary, not the dataclass's every field (report.to_dict() has those).
        return render.to_text(self)

    def __rich__(self):
        return render.to_rich(self)

    def print(self, file=None) -> None:
        """Render to the terminal (stdout unless `file` is given) with rich."""
        render.print_report(self, file)

    def to_json(self, path=None, indent=2) -> str:
        return render.to_json(self, path, indent)

    def to_csv(self, path=None, sensitivity=False) -> str:
        """The summary table (or, with `sensitivity=True`, one row per config × layer) as CSV."""
        return render.to_csv(self, path, sensitivity)

    def to_dataframe(self, sensitivity=False):
        """A pandas DataFrame of the summary (or of the per-layer errors), one row per config."""
        return render.to_dataframe(self, sensitivity)

    def plot_tradeoff(self, path=None):
        return plots.plot_tradeoff(self, path)

    def plot_sensitivity(self, path=None, top: int = 20):
        return plots.plot_sensitivity(self, path, top)

    # ---- files ------------------------------------------------------------------------
    def save(self, directory) -> dict[str, str]:
        """Write report.md, report.json, summary.csv, the trade-off plot and, when the report has per-layer
        errors, sensitivity.csv and its plot; return the paths written, by file name."""
        os.makedirs(directory, exist_ok=True)
        writers = {
            "report.md": self.to_markdown,
            "report.json": self.to_json,
            "summary.csv": self.to_csv,
            "tradeoff.png": self.plot_tradeoff,
        }
        if self.sensitivity_results():  # absent when it ran with sensitivity=False
            writers["sensitivity.csv"] = lambda path: self.to_csv(path, sensitivity=True)
            writers["sensitivity.png"] = self.plot_sensitivity
        paths = {}
        for name, write in writers.items():
            paths[name] = os.path.join(directory, name)
            write(paths[name])
        return paths
