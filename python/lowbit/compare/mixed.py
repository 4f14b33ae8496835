"""Proposing the smallest config that meets a perplexity budget: one of the measured configs as it is, or a
per-module mix of two of them (or of one and full precision).

The estimate: a uniform config's measured change of log-perplexity is shared among its
layers in proportion to each layer's own cost were it alone quantized (`LayerError.ppl_change`:
measured for the config's costliest few, the first-order gradient · output-error estimate for
the rest; a layer whose cost is negative gets no share). A mix's change is then the sum of the shares of the
scheme each layer ends up in. From a base config, layers are promoted to a higher precision (a measured config
of more bytes that itself fits the budget with the margin below, or full precision) in order of estimated gain
per extra byte until the estimate fits the budget with that margin. Every base and higher precision the user
measured is tried, and the smallest result wins; a measured config that meets the budget as it is competes
with its measured bytes and change. A mix is a first-order estimate, which is why `compare` measures the
proposed one and reports whether it met the budget.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

from ..schemes import FULL_PRECISION
from .report import ConfigResult, MixProposal

# Aim below the budget: the estimate ignores interactions between layers.
TARGET_FRACTION = 0.75
_EIGHT_BIT = ("int8", "int8-wo")


def _is_uniform(r: ConfigResult) -> bool:
    return bool(r.layers) and not r.config.get("module_overrides")


def _scheme(r: ConfigResult) -> str:
    return r.layers[0].scheme


def _shares(r: ConfigResult) -> dict[str, float]:
    """Each layer's part of `r`'s measured log-perplexity change (a worse-than-full change only)."""
    weights = {layer.name: math.log1p(max(layer.ppl_change, 0.0)) for layer in r.layers}
    total = sum(weights.values()) or 1.0
    change = math.log1p(max(r.ppl_change, 0.0))
    return {name: change * w / total for name, w in weights.items()}


def _can_promote(base: ConfigResult, high: ConfigResult) -> bool:
    """Whether `high`'s layers can sit in `base`'s config as module overrides: a config holds one set of 4-bit
    options and one LLM.int8() threshold, so only a 4-bit base takes 8-bit layers (8-bit to 8-bit saves nothing)."""
    return _scheme(base) not in _EIGHT_BIT and _scheme(high) in _EIGHT_BIT


def _mix(base: ConfigResult, high: ConfigResult | None, budget: float) -> tuple[int, MixProposal]:
    """`base` with its layers of most estimated gain per extra byte promoted to `high` (None: full precision)
    until the estimate fits the budget with the margin; (linear bytes, proposal)."""
    base_share = _shares(base)
    high_share = _shares(high) if high else defaultdict(float)
    high_bytes = {layer.name: layer.bytes for layer in high.layers} if high else {}
    gains = []
    for layer in base.layers:
        gain = base_share[layer.name] - high_share[layer.name]
        cost = high_bytes.get(layer.name, layer.full_bytes) - layer.bytes
        if gain > 0:
            gains.append((gain / max(cost, 1), gain, cost, layer.name))
    target = math.log1p(budget * TARGET_FRACTION)
    predicted = sum(base_share.values())  # log-perplexity change
    size = base.linear_bytes
    promoted = []
    for _, gain, cost, name in sorted(gains, reverse=True):
        if predicted <= target:
            break
        promoted.append(name)
        predicted -= gain
        size += cost
    config = dict(base.config)
    scheme = _scheme(high) if high else FULL_PRECISION
    if high is not None and scheme == "int8":
        config["llm_int8_threshold"] = high.config["llm_int8_threshold"]
    config["module_overrides"] = {
        pattern: scheme for pattern in _patterns(promoted, [layer.name for layer in base.layers])
    }
    return size, MixProposal(budget, base.name, config, len(promoted), math.expm1(predicted),
                             high=high.name if high else "full precision")  # fmt: skip


def propose(results: list[ConfigResult], budget: float) -> MixProposal:
    """The smallest config predicted to meet `budget`: a measured config that meets it as it is, or a mix.

    `results` are measured uniform configs with per-layer errors; `budget` is the allowed relative perplexity
    increase (0.01 = 1%).
    """
    if budget < 0:
        raise ValueError(f"the perplexity budget must be ≥ 0, got {budget}")
    uniform = [r for r in results if _is_uniform(r)]
    if not uniform:
        raise ValueError("proposing a mix needs at least one measured int8 or 4-bit config with per-layer errors")
    candidates = [
        (r.linear_bytes, r.ppl_change, MixProposal(budget, r.name, dict(r.config), 0, r.ppl_change))
        for r in uniform
        if r.ppl_change <= budget
    ]
    for base in uniform:
        highs = [h for h in uniform if _can_promote(base, h) and h.ppl_change <= budget * TARGET_FRACTION]
        for high in [*highs, None]:
            size, proposal = _mix(base, high, budget)
            candidates.append((size, proposal.predicted_change, proposal))
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def _patterns(chosen: list[str], everything: list[str]) -> list[str]:
    """Compact regexes matching exactly `chosen` among `everything`.

    Names differing only in their layer index are grouped: a kind chosen in every layer
    becomes one pattern (`^model\\.layers\\.\\d+\\.mlp\\.down_proj$`), a partial one lists
    its indices (`^model\\.layers\\.(3|7)\\.mlp\\.down_proj$`).
    """
    def split(name):
        match = re.search(r"\.(\d+)\.", name)
        if not match:
            return name, None
        return name[: match.start()] + ".{}." + name[match.end() :], match.group(1)

    kinds: dict[str, list[str]] = defaultdict(list)
    for name in everything:
        kind, index = split(name)
        kinds[kind].append(index)
    picked: dict[str, list[str]] = defaultdict(list)
    for name in chosen:
        kind, index = split(name)
        picked[kind].append(index)
    patterns = []
    for kind, indices in picked.items():
        if indices == [None]:
            patterns.append(f"^{re.escape(kind)}$")
            continue
        prefix, suffix = (re.escape(part) for part in kind.split(".{}."))
        if sorted(indices) == sorted(kinds[kind]):
            middle = r"\d+"
        else:
            middle = "(" + "|".join(sorted(indices, key=int)) + ")"
        patterns.append(f"^{prefix}\\.{middle}\\.{suffix}$")
    return patterns
