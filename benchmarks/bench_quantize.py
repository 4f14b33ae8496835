"""Quantization time of a 4096 x 14336 weight (Llama-3.1-8B's down_proj, transposed) on this CPU: plain 4-bit
quantization against the scale search, with and without importance weights, in the same run.

Each case runs interleaved with the others, `--repeats` times; the medians are printed and written as JSON.
The scale search's budget (issue #10): under 3x plain quantization."""

import argparse
import json
import platform
import statistics
import time

import torch

from lowbit import ops


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shape", type=int, nargs=2, default=(4096, 14336))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", help="write the medians here as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    W = torch.randn(*args.shape).to(getattr(torch, args.dtype))
    importance = torch.rand(args.shape[1])
    cases = {
        "quantize_4bit": lambda: ops.quantize_4bit(W, 64, "nf4"),
        "search (no importance)": lambda: ops.quantize_4bit_search(W, 64, "nf4"),
        "search (importance)": lambda: ops.quantize_4bit_search(W, 64, "nf4", importance=importance),
    }
    times = {name: [] for name in cases}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}
    plain = medians["quantize_4bit"]
    print(f"{list(args.shape)} {args.dtype}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for name, ms in medians.items():
        print(f"  {name:24s} {ms:8.1f} ms  {ms / plain:5.2f}x plain")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": list(args.shape), "dtype": args.dtype, "threads": torch.get_num_threads(),
                       "median_ms": medians}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
