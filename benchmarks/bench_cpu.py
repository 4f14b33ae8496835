"""CPU kernel benchmarks: lowbit's 4-bit and int8 linear layers against torch fp32 F.linear and
bitsandbytes' CPU layers, in the same run, plus quantization throughput against a plain copy.

Each case rotates through enough copies of its weights that they cannot stay in the last-level
cache (so every call streams its weight from memory, as in real decoding), and reports the
median of many calls, taken in three rounds that visit every variant in turn. Results go to a JSON file
and a table on stdout.

    python benchmarks/bench_cpu.py --out bench_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch
import torch.nn as nn

import lowbit

ROTATE_BYTES = 512 * 2**20  # well past any L3 on the machines we run on


def _median_ms(fn, calls: list, repeats: int) -> float:
    for call in calls[: min(3, len(calls))]:
        fn(call)  # warm-up: page in, pick kernels
    times = []
    for i in range(repeats):
        call = calls[i % len(calls)]
        t0 = time.perf_counter()
        fn(call)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _interleaved_medians(layers: dict, x: torch.Tensor, repeats: int, rounds: int = 3) -> dict:
    """Median ms per variant, its calls spread over `rounds` rounds that visit every variant in turn, so a
    drift in the machine's speed (this VM's cells move by ±10%) weighs on every variant alike."""
    times = {key: [] for key in layers}
    for _ in range(rounds):
        for key, copies in layers.items():
            times[key].append(_median_ms(lambda m: m(x), copies, max(1, repeats // rounds)))
    return {key: statistics.median(t) for key, t in times.items()}


def _copies(bytes_per_copy: int) -> int:
    return max(2, min(32, -(-ROTATE_BYTES // max(bytes_per_copy, 1))))


def _layers(make, linear: nn.Linear, nbytes: int) -> list:
    return [make(linear) for _ in range(_copies(nbytes))]


def bench_linear(n_out: int, k_in: int, batch: int, repeats: int, with_bnb) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(k_in, n_out, bias=False)
    x = torch.randn(batch, k_in)
    n = n_out * k_in
    with torch.inference_mode():
        layers = {
            "torch_fp32": [nn.Linear(k_in, n_out, bias=False) for _ in range(_copies(n * 4))],
            "lowbit_nf4": _layers(lambda lin: lowbit.Linear4bit.from_linear(lin, quant_type="nf4"), base, n // 2),
            "lowbit_int8": _layers(lambda lin: lowbit.Linear8bit.from_linear(lin, threshold=6.0), base, n),
            "lowbit_int8_wo": _layers(lambda lin: lowbit.Linear8bit.from_linear(lin, weight_only=True), base, n),
        }
        if with_bnb is not None:
            layers["bnb_nf4"] = _layers(lambda lin: _bnb_4bit(with_bnb, lin), base, n // 2)
            layers["bnb_int8"] = _layers(lambda lin: _bnb_8bit(with_bnb, lin), base, n)
        return _interleaved_medians(layers, x, repeats)


def _bnb_4bit(bnb, lin: nn.Linear):
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, quant_type="nf4", compress_statistics=False)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=False)  # fmt: skip
    return layer.to("cpu")


def _bnb_8bit(bnb, lin: nn.Linear):
    layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")


def bench_quantize(n_out: int, k_in: int, repeats: int) -> dict:
    W = torch.randn(n_out, k_in)
    dst = torch.empty_like(W)  # preallocated: the copy is timed, not page faults on fresh memory
    mb = W.numel() * 4 / 1e6
    copy_ms = _median_ms(lambda w: dst.copy_(w), [W], repeats)
    quant_ms = _median_ms(lambda w: lowbit.ops.quantize_4bit(w, 64, "nf4"), [W], repeats)
    return {"copy_MBps": mb / copy_ms * 1e3, "quantize_nf4_MBps": mb / quant_ms * 1e3, "copy_ms": copy_ms,
            "quantize_nf4_ms": quant_ms}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_cpu.json")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batches", default="1,4,8,16,64")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if installed")
    parser.add_argument("--shapes", default="4096x4096,14336x4096",
                        help="weights as OUTxIN, comma-separated; 'smollm2' adds the built-in model's four shapes")  # fmt: skip
    args = parser.parse_args()
    bnb = None
    if not args.no_bnb:  # (importing it prints a warning of its own on CPU-only machines)
        try:
            import bitsandbytes as bnb
        except ImportError:
            pass
    shapes = _shapes(args.shapes)
    rows = []
    for n_out, k_in in shapes:
        for batch in [int(b) for b in args.batches.split(",")]:
            r = bench_linear(n_out, k_in, batch, args.repeats if batch < 64 else max(9, args.repeats // 4), bnb)
            rows.append({"weight": f"{n_out}x{k_in}", "batch": batch, **r})
            print(_row(rows[-1]), flush=True)
    quant = bench_quantize(14336, 4096, 5)
    print(f"quantize 14336x4096 -> nf4: {quant['quantize_nf4_MBps']:.0f} MB/s "
          f"(memcpy {quant['copy_MBps']:.0f} MB/s, {quant['quantize_nf4_MBps'] / quant['copy_MBps']:.2f}x)")  # fmt: skip
    report = {
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lowbit": lowbit.__version__,
        "bitsandbytes": getattr(bnb, "__version__", None),
        "linear_ms": rows,
        "quantize": quant,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


# SmolLM2-135M's linear layers (out x in): q/o, k/v, gate/up, down.
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def _shapes(spec: str) -> list[tuple[int, int]]:
    shapes = []
    for item in spec.split(","):
        if item == "smollm2":
            shapes += SMOLLM2_SHAPES
        else:
            n_out, k_in = item.lower().split("x")
            shapes.append((int(n_out), int(k_in)))
    return shapes


def _row(r: dict) -> str:
    fp32 = r["torch_fp32"]
    cells = [f"{r['weight']:>10} M={r['batch']:<4}", f"fp32 {fp32:7.2f} ms"]
    for key in ("lowbit_nf4", "bnb_nf4", "lowbit_int8", "lowbit_int8_wo", "bnb_int8"):
        if key in r:
            cells.append(f"{key} {r[key]:7.2f} ms ({fp32 / r[key]:4.2f}x)")
    return " | ".join(cells)


if __name__ == "__main__":
    main()
