"""Shared device list, sizes and tolerance helpers for the op and layer tests."""

import contextlib
import platform

import pytest
import torch

from lowbit import ops, reference
from lowbit.formats import dynamic_map

# Every test that runs kernels takes its device from here (through the `device` and `kernel_device`
# fixtures in conftest.py): on a GPU machine the same tests check the CUDA kernels with no edits.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device here; these cases run on a GPU machine")]),
]  # fmt: skip

# lowbit's CPU kernel levels on this machine's architecture, lowest first (csrc/cpu/isa.h), and the ones below the
# top two that tests force with LOWBIT_CPU_ISA besides the native one (the portable level always among them).
ARCH = {"AMD64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
CPU_LEVELS = {"x86_64": ["portable", "avx2", "avx512", "amx"], "aarch64": ["portable", "neon", "dotprod"]}.get(
    ARCH, ["portable"])  # fmt: skip
LOWER_CPU_LEVELS = [*CPU_LEVELS[1:2], "portable"]

# Awkward sizes on purpose: 1 (decode), 17 (odd, not a multiple of anything), 1025 (one past a
# power of two, so blocks straddle rows and the last block is partial).
SIZES = [1, 17, 1025]
# Rows of x for the linear ops: 1 (decode), odd counts around the fused kernels' row tiles, and
# more rows than the fused CPU kernel takes (its GEMM path).
ROWS = [1, 3, 5, 17, 65]
# (in_features K, blocksize) of 4-bit weights: K a multiple of the blocksize, K equal to it, odd K
# whose blocks straddle rows (1025, 65), and K shorter than one block (17).
K_BLOCKSIZES = [(1024, 64), (256, 256), (1025, 64), (65, 32), (17, 32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]


def assert_close_to_exact(out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """The kernel may differ from the float64 truth by at most twice what the plain-PyTorch
    reference itself is off by at the same precision, plus one ulp of the largest output (the
    rounding of the final store, which the reference can happen to avoid on small cases)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    if exact.numel() == 0:
        return
    err = (out.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * exact.abs().max().item()
    assert err <= 2 * ref_err + ulp, f"{what}: error {err:.3g} vs reference error {ref_err:.3g} (+ulp {ulp:.3g})"


def linear_4bit_exact(x: torch.Tensor, packed, absmax, blocksize: int, quant_type: str, shape, nested=None, bias=None):
    """The float64 truth of linear_4bit: x times the dequantized weight (nested scales decoded first)."""
    scales = absmax if nested is None else nested.decode(absmax)
    W = reference.dequantize_4bit(packed, scales, blocksize, quant_type, shape, torch.float64)
    exact = x.double() @ W.t()
    return exact if bias is None else exact + bias.double()


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's CPU thread count set to n inside the block, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def int8_linear_exact(x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float, bias=None):
    """The float64 truth of LLM.int8() on x's 2-D rows: the reference's int8 activations and outlier columns,
    exact accumulation and scaling."""
    q, stats, cols = reference.int8_vectorwise_quant(x, threshold)
    w = CB.double() * SCB.double().unsqueeze(1) / 127
    exact = (q.double() @ w.t()) * stats.double().unsqueeze(1) / 127 + x[:, cols].double() @ w[:, cols].t()
    return exact if bias is None else exact + bias.double()


def op_cases(device="cpu"):
    """One call of every op (two of linear_4bit: plain and double-quantized scales): (op, args) on `device`."""
    W = torch.randn(24, 128, device=device)
    packed, absmax = ops.quantize_4bit(W, 64, "nf4")
    absmax_q, nested_absmax = ops.quantize_blockwise(absmax - absmax.mean())
    CB, SCB, _ = reference.int8_vectorwise_quant(W, 0.0)
    x = torch.randn(3, 128, device=device)
    code = dynamic_map(device)

    def randn(*shape, **kwargs):
        return torch.randn(*shape, device=device, **kwargs)

    return [
        (torch.ops.lowbit.quantize_4bit, (randn(1025), 64, "fp4")),
        (torch.ops.lowbit.quantize_4bit_search, (randn(7, 130), 64, "nf4", [1.0, 0.9, 0.8], randn(130).abs())),
        (torch.ops.lowbit.dequantize_4bit, (packed, absmax, 64, "nf4", [24, 128], torch.bfloat16)),
        (torch.ops.lowbit.quantize_blockwise, (randn(700), code, 256)),
        (torch.ops.lowbit.dequantize_blockwise, (absmax_q, nested_absmax, code, 256, torch.float32)),
        (torch.ops.lowbit.linear_4bit, (x, packed, absmax, 64, "nf4", [24, 128], randn(24))),
        (torch.ops.lowbit.linear_4bit,
         (x.requires_grad_(), packed, absmax_q, 64, "nf4", [24, 128], None, nested_absmax, code, 0.5, 256)),
        (torch.ops.lowbit.int8_vectorwise_quant, (randn(5, 64), 0.0)),
        (torch.ops.lowbit.int8_mm, (CB[:5].contiguous(), CB)),
        (torch.ops.lowbit.int8_linear, (randn(2, 128, requires_grad=True), CB, SCB, 0.0, randn(24))),
        (torch.ops.lowbit.int8_weight_linear, (randn(2, 128, requires_grad=True), CB, SCB, randn(24))),
    ]  # fmt: skip


def force_cpu_isa(monkeypatch, isa: str) -> None:
    """Run lowbit's CPU kernels of level `isa` (LOWBIT_CPU_ISA) for the rest of the test, or skip it, saying why,
    where this CPU cannot run them."""
    if isa not in CPU_LEVELS:
        pytest.skip(f"{isa} is not a CPU kernel level on {platform.machine()} (it has {', '.join(CPU_LEVELS)})")
    monkeypatch.setenv("LOWBIT_CPU_ISA", isa)
    if torch.ops.lowbit.cpu_isa() != isa:
        pytest.skip(f"this CPU cannot run lowbit's {isa} kernels (it runs {torch.ops.lowbit.cpu_isa()})")
