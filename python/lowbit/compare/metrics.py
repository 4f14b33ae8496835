"""Accuracy metrics comparing a quantized model's outputs with full precision.

Pure tensor functions (no model, no I/O) so each can be checked against hand-computed
values, plus :class:`AgreementAccumulator`, which folds them over evaluation windows.
All reductions run in float64: the differences being measured are small, and summing
thousands of positions in float32 would blur them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def kl_divergence(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ other) per position, in nats, from log-probabilities over the last dim."""
    logp_ref, logp = logp_ref.double(), logp.double()
    # exp(logp_ref) * (logp_ref - logp), with 0 * log 0 taken as 0 where ref has no mass.
    terms = torch.where(logp_ref == -math.inf, 0.0, logp_ref.exp() * (logp_ref - logp))
    return terms.sum(-1).clamp_min(0.0)  # clamp: rounding can give -1e-17 for equal inputs


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats) of each target token under `logits` [..., vocab]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def perplexity(nll_sum: float, count: int) -> float:
    """exp of the mean negative log-likelihood."""
    if count <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(nll_sum / count)


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two equally long lists (ties get their mean rank), or None for fewer
    than 3 pairs or a constant list."""
    if len(a) != len(b):
        raise ValueError(f"rank_correlation needs lists of one length, got {len(a)} and {len(b)}")
    if len(a) < 3:
        return None

    def ranks(values):
        t = torch.tensor(values, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(values), dtype=torch.float64)
        for v in t.unique():  # mean rank for ties
            tied = t == v
            r[tied] = r[tied].mean()
        return r - r.mean()

    ra, rb = ranks(a), ranks(b)
    norm = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / norm if norm > 0 else None


def top1_agreement(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per position: 1.0 where both argmaxes agree, else 0.0."""
    return (logits_ref.argmax(-1) == logits.argmax(-1)).double()


def topk_overlap(logits_ref: torch.Tensor, logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Per position: fraction of the reference's top-k tokens that are also in the other's top-k."""
    top_ref = logits_ref.topk(k, dim=-1).indices
    top = logits.topk(k, dim=-1).indices
    shared = (top_ref.unsqueeze(-1) == top.unsqueeze(-2)).any(-1).sum(-1)
    return shared.double() / k


def relative_error(ref: torch.Tensor, other: torch.Tensor) -> float:
    """‖other − ref‖ / ‖ref‖ (Frobenius over all elements)."""
    return math.sqrt(squared_error(ref, other) / max(squared_norm(ref), 1e-300))


def squared_error(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float((other.double() - ref.double()).pow(2).sum())


def squared_norm(t: torch.Tensor) -> float:
    return float(t.double().pow(2).sum())


def first_divergence(ref: list[int], other: list[int]) -> int | None:
    """Index of the first token where two sequences differ (a length mismatch counts); None if equal."""
    for i, (a, b) in enumerate(zip(ref, other)):
        if a != b:
            return i
    return None if len(ref) == len(other) else min(len(ref), len(other))


@dataclass
class Agreement:
    """Next-token agreement and output drift over every evaluated position."""

    positions: int
    kl_mean: float
    kl_p99: float
    top1: float
    top5: float
    logits_rel_error: float
    hidden_rel_error: float


class AgreementAccumulator:
    """Folds per-window comparisons into one :class:`Agreement`.

    Relative errors are accumulated as sums of squares so the result equals the
    relative error over all positions at once, not a mean of per-window ratios.
    """

    def __init__(self) -> None:
        self._kl: list[torch.Tensor] = []
        self._top1 = 0.0
        self._top5 = 0.0
        self._positions = 0
        self._sq = {"logits": [0.0, 0.0], "hidden": [0.0, 0.0]}  # [error², reference²]

    def add(self, logits_ref, logits, hidden_ref, hidden) -> None:
        """Add positions: logits [n, vocab], hidden [n, dim], reference first."""
        logp_ref = torch.log_softmax(logits_ref.double(), -1)
        logp = torch.log_softmax(logits.double(), -1)
        self._kl.append(kl_divergence(logp_ref, logp).cpu())
        self._top1 += float(top1_agreement(logits_ref, logits).sum())
        self._top5 += float(topk_overlap(logits_ref, logits, 5).sum())
        self._positions += logits.shape[0]
        for key, ref, out in (("logits", logits_ref, logits), ("hidden", hidden_ref, hidden)):
            self._sq[key][0] += squared_error(ref, out)
            self._sq[key][1] += squared_norm(ref)

    def result(self) -> Agreement:
        if not self._positions:
            raise ValueError("no positions were compared")
        kl = torch.cat(self._kl)

        def rel(key):
            err, ref = self._sq[key]
            return math.sqrt(err / max(ref, 1e-300))

        return Agreement(
            positions=self._positions,
            kl_mean=float(kl.mean()),
            kl_p99=float(torch.quantile(kl, 0.99)),
            top1=self._top1 / self._positions,
            top5=self._top5 / self._positions,
            logits_rel_error=rel("logits"),
            hidden_rel_error=rel("hidden"),
        )
