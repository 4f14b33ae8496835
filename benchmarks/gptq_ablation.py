"""GPTQ ablation on the built-in model: perplexity change and quantization time of NF4 and int8-wo with and
without GPTQ and the activation-weighted scale search, on the default text or IDLE's NEWS.txt.

    python benchmarks/gptq_ablation.py default|news   → benchmarks/results/gptq-ablation-<text>.json
"""

import json
import os
import sys
import time

import idlelib

import lowbit

CONFIGS = "nf4,nf4-aw,nf4-gptq,nf4-aw-gptq,int8-wo,int8-wo-gptq"


def main(text_name: str) -> None:
    news = os.path.join(os.path.dirname(idlelib.__file__), "NEWS.txt")
    text = None if text_name == "default" else open(news, encoding="utf-8").read()
    start = time.time()
    report = lowbit.compare(None, CONFIGS, text=text, text_source=None if text is None else "IDLE's NEWS.txt",
                            prompts=[], sensitivity=False, timing=False, progress=False)  # fmt: skip
    rows = [{"config": r.name, "ppl_change": r.ppl_change, "quantize_s": r.quantize_seconds,
             "linear_mb": r.linear_bytes / 1e6} for r in report.results]  # fmt: skip
    out = os.path.join(os.path.dirname(__file__), "results", f"gptq-ablation-{text_name}.json")
    with open(out, "w") as f:
        json.dump({"text": text_name, "setup": report.setup, "rows": rows, "wall_s": time.time() - start}, f, indent=1)
    for row in rows:
        print(f"{row['config']:14} {row['ppl_change']:+.2%}  quantize {row['quantize_s']:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "default")
