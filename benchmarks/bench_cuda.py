"""CUDA benchmark of the 4-bit and LLM.int8() linears against torch bf16 F.linear, measured in the same run.

    python benchmarks/bench_cuda.py --out results/     # on a GPU machine (scripts/gpu_check.sh runs it)

Llama-3.1-8B linear shapes (K -> N), M rows of bf16 activations, NF4 with blocksize 64 (plus double
quantization at M = 1). Each timing is the median over repeats of back-to-back launches that cycle through
enough copies of the weights to not be served from L2. The floor at small M is bytes moved over the
measured device-to-device copy bandwidth; the table gives the fraction of it reached. Up to 8 rows the other
GEMV designs (LOWBIT_GEMV=lds, the split GEMV decoding through shared memory, and v1, the first design) are timed
too, in the same run. Also times
quantize_4bit of a 14336 x 4096 bf16 weight against copy bandwidth.

LLM.int8() rows (int8_linear, same shapes, M and method): threshold 0, and threshold 6.0 with ~0.1% of the
input's columns planted as outliers (8.0 in every row); at M <= 16 also from CUDA-graph replays (no host
launch overhead, as in a graph-captured decode step); at M <= 64 both CUDA paths (the dp4a GEMV and
cuBLASLt + epilogue, forced through LOWBIT_INT8_GEMV_MAX_ROWS) are timed, to set the cut-over in
csrc/cuda/int8_linear.cu; bitsandbytes' Linear8bitLt in the same run where it is installed.
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


def graph_ms(fn, copies: int, calls: int = 50) -> float:
    """Median per-call time of fn(i), i cycling over `copies`, replayed from one CUDA graph of `calls` calls:
    the GPU's time without the host's launch overhead (what a graph-captured decode step sees)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(copies):
            fn(i)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    return time_ms(lambda i: graph.replay(), copies=1, iters=5) / calls


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
        if M <= 8:  # the other GEMV designs (LOWBIT_GEMV), in the same run
            for design in ("lds", "v1"):
                os.environ["LOWBIT_GEMV"] = design
                row[f"nf4_gemv_{design}_ms"] = time_ms(nf4(x, plain), copies=len(plain))
            del os.environ["LOWBIT_GEMV"]
        if M == 1:
            row["nf4_dq_ms"] = time_ms(nf4(x, double), copies=len(double))
        rows.append(row)
        v1 = (f"  (GEMV lds {row['nf4_gemv_lds_ms']:8.4f} ms, v1 {row['nf4_gemv_v1_ms']:8.4f} ms)"
              if "nf4_gemv_v1_ms" in row else "")  # fmt: skip
        print(f"{name:8s} M={M:5d}  bf16 {t_bf16:8.4f} ms  nf4 {t_nf4:8.4f} ms  x{t_bf16 / t_nf4:5.2f}  "
              f"{row['nf4_bandwidth_fraction']:.0%} of copy bandwidth{v1}", flush=True)  # fmt: skip
    return rows


def rotated_int8(K: int, N: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of one int8 weight's (CB, SCB) enough to leave L2."""
    CB, SCB, _ = ops.int8_vectorwise_quant(torch.randn(N, K, device="cuda", dtype=torch.bfloat16), 0.0)
    return [(CB.clone(), SCB.clone()) for _ in range(max(1, ROTATED_BYTES // (K * N)))]


def with_outlier_columns(x: torch.Tensor, fraction: float = 0.001) -> torch.Tensor:
    """x with ~fraction of its columns (at least one) set to 8.0, past LLM.int8()'s threshold of 6.0."""
    columns = torch.randperm(x.shape[1], device=x.device)[: max(1, round(fraction * x.shape[1]))]
    planted = x.clone()
    planted[:, columns] = 8.0
    return planted


def int8_path_ms(max_gemv_rows: int, fn, copies: int) -> float:
    """time_ms with int8_linear's GEMV cut-over moved (csrc/cuda/int8_linear.cu reads it on every call)."""
    os.environ["LOWBIT_INT8_GEMV_MAX_ROWS"] = str(max_gemv_rows)
    try:
        return time_ms(fn, copies)
    finally:
        del os.environ["LOWBIT_INT8_GEMV_MAX_ROWS"]


def bitsandbytes_layers(K: int, N: int) -> list | None:
    """Copies of one bitsandbytes Linear8bitLt (inference weights) enough to leave L2, or None where
    bitsandbytes is missing or fails."""
    try:
        import bitsandbytes as bnb

        weight = torch.randn(N, K, dtype=torch.bfloat16)
        layers = []
        for _ in range(max(1, ROTATED_BYTES // (K * N))):
            layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False)
            layers.append(layer.cuda())
        return layers
    except Exception as e:  # noqa: BLE001 - an optional comparison must not stop the run
        print(f"bitsandbytes: skipped ({type(e).__name__}: {e})", flush=True)
        return None


def bitsandbytes_ms(layers: list | None, x: torch.Tensor, threshold: float) -> float | None:
    if layers is None:
        return None
    for layer in layers:
        layer.state.threshold = threshold
    try:
        with torch.no_grad():
            return time_ms(lambda i: layers[i](x), copies=len(layers))
    except Exception as e:  # noqa: BLE001
        print(f"bitsandbytes: failed ({type(e).__name__}: {e})", flush=True)
        return None


def bench_int8_linear(name: str, K: int, N: int, bandwidth: float) -> list[dict]:
    rows = []
    bf16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(1, ROTATED_BYTES // (K * N * 2)))]
    int8 = rotated_int8(K, N)
    bnb_layers = bitsandbytes_layers(K, N)
    for M in ROWS:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        x_outliers = with_outlier_columns(x)

        def int8_linear(inputs, threshold):
            return lambda i: ops.int8_linear(inputs, int8[i][0], int8[i][1], threshold)

        t_bf16 = time_ms(lambda i: F.linear(x, bf16[i]), copies=len(bf16))
        t_int8 = time_ms(int8_linear(x, 0.0), copies=len(int8))
        t_outliers = time_ms(int8_linear(x_outliers, 6.0), copies=len(int8))
        moved = K * N + N * 4 + (M * K + M * N) * 2
        row = dict(shape=name, K=K, N=N, M=M, bf16_ms=t_bf16, int8_ms=t_int8, speedup=t_bf16 / t_int8,
                   int8_t6_ms=t_outliers, speedup_t6=t_bf16 / t_outliers,
                   outlier_columns=int((x_outliers != x).any(0).sum()),
                   int8_bandwidth_fraction=moved / (t_int8 / 1e3) / bandwidth)  # fmt: skip
        if M <= 16:  # decode: eager timings can be bound by host launch overhead; graph replays are not
            row["bf16_graph_ms"] = graph_ms(lambda i: F.linear(x, bf16[i]), copies=len(bf16))
            row["int8_graph_ms"] = graph_ms(int8_linear(x, 0.0), copies=len(int8))
            row["int8_t6_graph_ms"] = graph_ms(int8_linear(x_outliers, 6.0), copies=len(int8))
        if M <= 64:  # both paths, for the cut-over (the GEMV re-streams the weight per 8 rows: not beyond)
            row["gemv_ms"] = int8_path_ms(1 << 30, int8_linear(x, 0.0), len(int8))
            row["gemm_ms"] = int8_path_ms(0, int8_linear(x, 0.0), len(int8))
        for threshold, key in ((0.0, "bnb_ms"), (6.0, "bnb_t6_ms")):
            row[key] = bitsandbytes_ms(bnb_layers, x if threshold == 0 else x_outliers, threshold)
        rows.append(row)
        paths = f"  gemv {row['gemv_ms']:8.4f} gemm {row['gemm_ms']:8.4f}" if "gemv_ms" in row else ""
        if "int8_graph_ms" in row:
            graph_speedups = [row["bf16_graph_ms"] / row[key] for key in ("int8_graph_ms", "int8_t6_graph_ms")]
            paths += "  graphs x{:5.2f} t6 x{:5.2f}".format(*graph_speedups)
        print(f"{name:8s} M={M:5d}  bf16 {t_bf16:8.4f} ms  int8 {t_int8:8.4f} ms  x{t_bf16 / t_int8:5.2f}  "
              f"t6 {t_outliers:8.4f} ms  x{t_bf16 / t_outliers:5.2f}{paths}", flush=True)  # fmt: skip
    return rows


def guarded(bench, name: str, K: int, N: int, bandwidth: float) -> list[dict]:
    """bench's rows, or one row with the error: a failing shape must not lose the rest of the run's results."""
    try:
        return bench(name, K, N, bandwidth)
    except Exception as e:  # noqa: BLE001
        print(f"{name}: {bench.__name__} failed: {type(e).__name__}: {e}", flush=True)
        return [dict(shape=name, K=K, N=N, error=f"{type(e).__name__}: {e}")]


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
        int8_linear=[
            row for name, (K, N) in SHAPES.items() for row in guarded(bench_int8_linear, name, K, N, bandwidth)
        ],
        quantize=bench_quantize(bandwidth),
    )  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_cuda.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
