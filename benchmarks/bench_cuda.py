"""CUDA benchmark of the 4-bit linear against torch bf16 F.linear, measured in the same run.

    python benchmarks/bench_cuda.py --out results/     # on a GPU machine (scripts/gpu_check.sh runs it)

Llama-3.1-8B linear shapes (K -> N), M rows of bf16 activations, NF4 with blocksize 64 (plus double
quantization at M = 1). Each timing is the median over repeats of back-to-back launches that cycle through
enough copies of the weights to not be served from L2. The floor at small M is bytes moved over the
measured device-to-device copy bandwidth; the table gives the fraction of it reached. Also times
quantize_4bit of a 14336 x 4096 bf16 weight against copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

import torch
import torch.nn.functional as F

import lowbit
from lowbit import ops
from lowbit.formats import NestedState

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
ROWS = (1, 4, 16, 64, 256, 4096)
ROTATED_BYTES = 512 * 2**20  # well past any L2 (H200: 50 MiB)


def time_ms(fn, copies: int, iters: int = 50, repeats: int = 7) -> float:
    """Median per-call time of fn(i) for i cycling over `copies`, from CUDA events around `iters` calls."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fn(i % copies)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes/s (read + write)."""
    src = torch.empty(ROTATED_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda i: dst.copy_(src), copies=1, iters=20)
    return 2 * src.numel() / (ms / 1e3)


def rotated_nf4(K: int, N: int, double_quant: bool) -> tuple[list[tuple], int]:
    """Copies of one NF4 weight's (packed, absmax, nested) enough to leave L2, and its size in bytes."""
    layer = lowbit.Linear4bit.from_linear(
        torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16), quant_type="nf4",
        double_quant=double_quant)  # fmt: skip
    nbytes = sum(t.numel() * t.element_size() for t in layer.buffers())
    nested = layer.quant_state().nested
    copies = [
        (layer.weight.clone(), layer.absmax.clone(),
         None if nested is None else NestedState(nested.absmax.clone(), nested.code, nested.offset))
        for _ in range(max(1, ROTATED_BYTES // nbytes))
    ]  # fmt: skip
    return copies, nbytes


def bench_linear(name: str, K: int, N: int, bandwidth: float) -> list[dict]:
    rows = []
    bf16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(1, ROTATED_BYTES // (K * N * 2)))]
    plain, nf4_bytes = rotated_nf4(K, N, double_quant=False)
    double, _ = rotated_nf4(K, N, double_quant=True)

    def nf4(x, weights):
        return lambda i: ops.linear_4bit(x, weights[i][0], weights[i][1], 64, "nf4", (N, K), None, weights[i][2])

    for M in ROWS:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        t_bf16 = time_ms(lambda i: F.linear(x, bf16[i]), copies=len(bf16))
        t_nf4 = time_ms(nf4(x, plain), copies=len(plain))
        moved = nf4_bytes + (M * K + M * N) * 2
        row = dict(shape=name, K=K, N=N, M=M, bf16_ms=t_bf16, nf4_ms=t_nf4, speedup=t_bf16 / t_nf4,
                   nf4_bandwidth_fraction=moved / (t_nf4 / 1e3) / bandwidth)  # fmt: skip
        if M == 1:
            row["nf4_dq_ms"] = time_ms(nf4(x, double), copies=len(double))
        rows.append(row)
        print(f"{name:8s} M={M:5d}  bf16 {t_bf16:8.4f} ms  nf4 {t_nf4:8.4f} ms  x{t_bf16 / t_nf4:5.2f}  "
              f"{row['nf4_bandwidth_fraction']:.0%} of copy bandwidth", flush=True)  # fmt: skip
    return rows


def bench_quantize(bandwidth: float) -> dict:
    weight = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda i: ops.quantize_4bit(weight, 64, "nf4"), copies=1, iters=10)
    moved = weight.numel() * 2 + weight.numel() // 2 + weight.numel() // 64 * 4
    return dict(op="quantize_4bit", shape=[14336, 4096], ms=ms, bandwidth_fraction=moved / (ms / 1e3) / bandwidth)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="folder for bench_cuda.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    results = dict(
        device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
        cuda=torch.version.cuda, lowbit=lowbit.build_info(), copy_bandwidth_GBps=bandwidth / 1e9,
        linear=[row for name, (K, N) in SHAPES.items() for row in bench_linear(name, K, N, bandwidth)],
        quantize=bench_quantize(bandwidth),
    )  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_cuda.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
