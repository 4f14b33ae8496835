"""Proposing a per-module precision mix that meets a perplexity budget.

The estimate: a uniform config's measured change of log-perplexity is shared among its
layers in proportion to each layer's own cost were it alone quantized (`LayerError.ppl_change`:
measured for the config's costliest few, the first-order gradient · output-error estimate for
the rest; a layer whose cost is negative gets no share). A mix's change is then the sum of the shares of the
scheme each layer ends up in. Layers are promoted from the 4-bit base to the higher precision in
order of estimated gain per extra byte until the estimate fits the budget with a margin.
It is a first-order estimate, which is why `compare` measures the proposed mix and
reports whether it met the budget.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

from .report import ConfigResult, MixProposal

# Aim below the budget: the estimate ignores interactions between layers.
TARGET_FRACTION = 0.75


def _is_uniform(r: ConfigResult) -> bool:
    return bool(r.layers) and not r.config.get("module_overrides")


def _shares(r: ConfigResult) -> dict[str, float]:
    """Each layer's part of `r`'s measured log-perplexity change (a worse-than-full change only)."""
    weights = {layer.name: math.log1p(max(layer.ppl_change, 0.0)) for layer in r.layers}
    total = sum(weights.values()) or 1.0
    change = math.log1p(max(r.ppl_change, 0.0))
    return {name: change * w / total for name, w in weights.items()}


def propose(results: list[ConfigResult], budget: float) -> MixProposal:
    """A mix of the best measured 4-bit scheme with int8 (or full precision) meeting `budget`.

    `results` are measured uniform configs with per-layer errors; `budget` is the allowed
    relative perplexity increase (0.01 = 1%).
    """
    if budget < 0:
        raise ValueError(f"the perplexity budget must be ≥ 0, got {budget}")
    uniform = [r for r in results if _is_uniform(r)]
    four_bit = [r for r in uniform if r.layers[0].scheme in ("nf4", "fp4")]
    eight_bit = [r for r in uniform if r.layers[0].scheme == "int8"]
    if not four_bit and not eight_bit:
        raise ValueError("proposing a mix needs at least one measured int8 or 4-bit config with per-layer errors")
    base = min(four_bit or eight_bit, key=lambda r: (r.ppl_change, r.linear_bytes))
    # The higher precision: int8 when a measured int8 config itself fits the budget, else full.
    fitting_int8 = [r for r in eight_bit if r is not base and r.ppl_change <= budget * TARGET_FRACTION]
    high = min(fitting_int8, key=lambda r: r.ppl_change) if fitting_int8 else None

    base_share = _shares(base)
    high_share = _shares(high) if high else defaultdict(float)
    high_bytes = {layer.name: layer.bytes for layer in high.layers} if high else {}
    gains = []
    for layer in base.layers:
        gain = base_share[layer.name] - high_share[layer.name]
        cost = high_bytes.get(layer.name, layer.full_bytes) - layer.bytes
        if gain > 0:
            gains.append((gain / max(cost, 1), gain, layer.name))
    target = math.log1p(budget * TARGET_FRACTION)
    predicted = sum(base_share.values())  # log-perplexity change
    promoted = []
    for _, gain, name in sorted(gains, reverse=True):
        if predicted <= target:
            break
        promoted.append(name)
        predicted -= gain
    high_scheme = "int8" if high else "none"
    config = dict(base.config)
    if high:
        config["llm_int8_threshold"] = high.config["llm_int8_threshold"]
    config["module_overrides"] = {
        pattern: high_scheme for pattern in _patterns(promoted, [layer.name for layer in base.layers])
    }
    return MixProposal(budget, base.name, config, len(promoted), math.expm1(predicted))


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
