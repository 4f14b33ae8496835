"""How well the report's per-layer cost estimate ranks layers: for every quantized layer of the built-in
model, the estimate (`lowbit.compare.evaluate.layer_errors`: first-order, Σ gradient · output error) against
the measured perplexity change of quantizing that layer alone, every other layer in full precision, on the
same tokens (the report's sensitivity window: the first 512 tokens of its default text).

    python benchmarks/sensitivity_study.py nf4 fp4 --out sensitivity.json

Prints, per config, Spearman's rank correlation over all layers and the layers that cost most."""

import argparse
import json
import math

from lowbit.compare.api import CALIBRATION_TOKENS, DEFAULT_CONTEXT, DEFAULT_STRIDE, DEFAULT_TOKENS, _tokenize
from lowbit.compare.data import calibration_text, default_text, strided_windows
from lowbit.compare.evaluate import layer_errors, nll_with_layer_swapped, summed_nll
from lowbit.compare.metrics import rank_correlation
from lowbit.compare.models import load_full_precision, quantized_copy
from lowbit.compare.presets import preset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="report presets, e.g. nf4 fp4 int8")
    parser.add_argument("--out", help="write every layer's estimate and measurement here as JSON")
    args = parser.parse_args()
    loaded = load_full_precision(None)
    ids = _tokenize(loaded, default_text(), DEFAULT_TOKENS)
    window = strided_windows(len(ids), DEFAULT_CONTEXT, DEFAULT_STRIDE)[:1]
    tokens = window[0].scored
    full_nll = summed_nll(loaded.model, ids, window)
    calibration = _tokenize(loaded, calibration_text(), CALIBRATION_TOKENS)
    study = {}
    for name in args.configs:
        quantized, _ = quantized_copy(loaded.model, preset(name), calibration)
        errors = layer_errors(loaded.model, quantized, ids, window)
        modules = dict(quantized.named_modules())
        rows = {
            layer: {
                "estimated": math.expm1(error.est_nll / tokens),
                "measured": math.expm1(
                    (nll_with_layer_swapped(loaded.model, layer, modules[layer], ids, window) - full_nll) / tokens
                ),
            }
            for layer, error in errors.items()
        }
        rho = rank_correlation([r["estimated"] for r in rows.values()], [r["measured"] for r in rows.values()])
        study[name] = {"spearman": rho, "tokens": tokens, "layers": rows}
        print(f"{name}: {len(rows)} layers, Spearman(estimate, measured) = {rho:+.3f}")
        for layer, r in sorted(rows.items(), key=lambda kv: -kv[1]["measured"])[:5]:
            print(f"  {layer:40s} measured {r['measured']:+.2%}  estimated {r['estimated']:+.2%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(study, f, indent=1)


if __name__ == "__main__":
    main()
