"""Every native op against its plain-PyTorch reference (lowbit.reference), opcheck, autograd and bad input."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    ARCH,
    CPU_LEVELS,
    DTYPES,
    K_BLOCKSIZES,
    QUANT_TYPES,
    ROWS,
    SIZES,
    assert_close_to_exact,
    cpu_threads,
    force_cpu_isa,
    int8_linear_exact,
    linear_4bit_exact,
    op_cases,
)

import lowbit
from lowbit import ops, reference
from lowbit.fallback import native_devices
from lowbit.formats import SCALE_SEARCH_RATIOS, NestedState, code_4bit, dynamic_map


# -- 4-bit ---------------------------------------------------------------------------------------


def _assert_same_on_every_device(outputs, cpu_outputs):
    """Quantized bytes and scales are specified bit for bit: a weight quantized on any device saves the
    same checkpoint as on the CPU."""
    for out, cpu in zip(outputs, cpu_outputs):
        assert torch.equal(out.cpu(), cpu)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES + [4096 * 3 + 5])
def test_quantize_4bit_matches_reference_bit_for_bit(kernel_device, quant_type, blocksize, dtype, numel):
    A = (torch.randn(numel) * 3).to(dtype)
    packed, absmax = ops.quantize_4bit(A.to(kernel_device), blocksize, quant_type)
    ref_packed, ref_absmax = reference.quantize_4bit(A.to(kernel_device), blocksize, quant_type)
    assert packed.shape == ((numel + 1) // 2, 1) and packed.dtype == torch.uint8
    assert absmax.shape == (-(-numel // blocksize),) and absmax.dtype == torch.float32
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)
    _assert_same_on_every_device((packed, absmax), reference.quantize_4bit(A, blocksize, quant_type))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_edge_values(kernel_device, quant_type):
    # Exact zeros, a whole zero block, the block maximum, and values on code midpoints.
    code = code_4bit(quant_type)
    mids = (code.sort().values[:-1] + code.sort().values[1:]) / 2
    A = torch.cat([torch.zeros(64), mids, -mids, torch.tensor([1.0, -1.0, 0.0, -0.0, 1e-30, -1e-30]), code])
    packed, absmax = ops.quantize_4bit(A.to(kernel_device), 64, quant_type)
    ref_packed, ref_absmax = reference.quantize_4bit(A, 64, quant_type)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)
    assert absmax[0] == 0  # the all-zero block


def _importance(k: int, weighted: bool):
    """Per-input-feature weights for the scale search, a few of them zero (channels no input uses), or None."""
    if not weighted:
        return None
    h = torch.rand(k) * 4
    h[::7] = 0
    return h


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (17,), (5, 17), (3, 1025), (24, 128)])
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
def test_quantize_4bit_search_matches_reference_bit_for_bit(kernel_device, quant_type, blocksize, dtype, shape,
                                                            weighted):  # fmt: skip
    # The search compares float sums; the kernels add them in the reference's order, so every device picks
    # the same scale and codes (and a weight quantized anywhere saves the same checkpoint).
    A = (torch.randn(shape) * 3).to(dtype)
    importance = _importance(shape[-1], weighted)
    on = (lambda t: None if t is None else t.to(kernel_device))
    packed, absmax = ops.quantize_4bit_search(on(A), blocksize, quant_type, importance=on(importance))
    ref_packed, ref_absmax = reference.quantize_4bit_search(A, blocksize, quant_type, SCALE_SEARCH_RATIOS, importance)
    numel = A.numel()
    assert packed.shape == ((numel + 1) // 2, 1) and packed.dtype == torch.uint8
    assert absmax.shape == (-(-numel // blocksize),) and absmax.dtype == torch.float32
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)


def _block_errors(A, packed, absmax, quant_type, importance, blocksize=64):
    """Each block's (importance-weighted) squared error of a decoded 4-bit weight, in float64."""
    decoded = reference.dequantize_4bit(packed, absmax, blocksize, quant_type, A.shape, torch.float64)
    h = torch.ones(A.shape[-1], dtype=torch.float64) if importance is None else importance.double()
    return ((A.double() - decoded) ** 2 * h).reshape(-1, blocksize).sum(1)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
def test_quantize_4bit_search_lowers_every_blocks_error(quant_type, weighted):
    # Ratio 1 is plain quantization (full blocks), so no block can end worse than plain; on heavy-tailed
    # weights clipping the largest value pays, so the total must drop by a clear margin.
    A = torch.distributions.StudentT(4.0).sample((96, 256))
    importance = _importance(256, weighted)
    plain = _block_errors(A, *ops.quantize_4bit(A, 64, quant_type), quant_type, importance)
    searched = _block_errors(A, *ops.quantize_4bit_search(A, 64, quant_type, importance=importance), quant_type,
                             importance)  # fmt: skip
    assert (searched <= plain * (1 + 1e-5)).all()
    assert searched.sum() < 0.95 * plain.sum(), (searched.sum() / plain.sum()).item()  # measured: 0.91 or less


def test_quantize_4bit_search_with_ratio_one_only_is_plain_quantization_plus_a_refit():
    # With no grid, full blocks either keep the absmax (and then plain quantization's exact bytes) or take the
    # least-squares refit; an importance of zero leaves nothing to fit, so every block stays plain.
    A = torch.randn(8, 128)
    plain = ops.quantize_4bit(A, 64, "nf4")
    unfit = ops.quantize_4bit_search(A, 64, "nf4", [1.0], torch.zeros(128))
    assert all(torch.equal(p, u) for p, u in zip(plain, unfit))
    refit = ops.quantize_4bit_search(A, 64, "nf4", [1.0])
    assert not torch.equal(refit[1], plain[1])  # some blocks take their least-squares scale


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_search_edge_values(kernel_device, quant_type):
    # A zero block keeps scale 0 and the zero code, as plain quantization; tiny and huge blocks stay finite.
    A = torch.cat([torch.zeros(64), torch.full((64,), 1e-39), torch.randn(64) * 1e30, torch.randn(64) * 1e-30])
    packed, absmax = ops.quantize_4bit_search(A.to(kernel_device), 64, quant_type)
    ref = reference.quantize_4bit_search(A, 64, quant_type, SCALE_SEARCH_RATIOS)
    assert torch.equal(packed.cpu(), ref[0]) and torch.equal(absmax.cpu(), ref[1])
    assert absmax[0] == 0 and torch.isfinite(absmax).all()
    assert torch.equal(packed[:32].cpu(), ops.quantize_4bit(torch.zeros(64), 64, quant_type)[0])


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 1024])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (17, 1025), (3, 5, 7)])
def test_dequantize_4bit_matches_reference(device, quant_type, blocksize, dtype, shape):
    A = torch.randn(shape, device=device)
    packed, absmax = ops.quantize_4bit(A, blocksize, quant_type)
    out = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)
    ref = reference.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out, ref)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_native_code_tables_match_python(device, quant_type):
    # Every code in both nibbles, absmax 1: the C++ table must be the Python one.
    packed = torch.arange(256, dtype=torch.uint8, device=device).view(-1, 1)
    out = ops.dequantize_4bit(packed, torch.ones(16, device=device), 32, quant_type, (512,)).cpu()
    code = code_4bit(quant_type)
    assert torch.equal(out[0::2], code.repeat_interleave(16))
    assert torch.equal(out[1::2], code.repeat(16))


@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES + [5000])
def test_blockwise_8bit_matches_reference(device, blocksize, dtype, numel):
    A = torch.randn(numel).to(dtype)
    q, absmax = ops.quantize_blockwise(A.to(device), blocksize=blocksize)
    ref_q, ref_absmax = reference.quantize_blockwise(A.to(device), blocksize=blocksize)
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)
    _assert_same_on_every_device((q, absmax), reference.quantize_blockwise(A, blocksize=blocksize))
    out = ops.dequantize_blockwise(q, absmax, blocksize=blocksize, dtype=dtype)
    assert torch.equal(out, reference.dequantize_blockwise(q, absmax, blocksize=blocksize, dtype=dtype))
    out, q, absmax = out.cpu(), q.cpu(), absmax.cpu()
    # Round to nearest: never further than half the widest gap of the map, times the block scale.
    gap = dynamic_map().diff().max()
    scale = absmax.repeat_interleave(blocksize)[:numel]
    bound = gap / 2 * scale * (1 + 1e-6) + torch.finfo(dtype).eps * A.float().abs()
    assert ((out.float() - A.float()).abs() <= bound).all()


def test_dynamic_map_shape():
    code = dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert (code.diff() >= 0).all() and code.max() == 1.0 and (code == 0).any()


# -- linear_4bit ---------------------------------------------------------------------------------


def _quantized(N, K, quant_type, blocksize, double_quant, device="cpu"):
    W = torch.randn(N, K, device=device)
    packed, absmax = ops.quantize_4bit(W, blocksize, quant_type)
    nested = None
    if double_quant:
        offset = absmax.mean()
        absmax, nested_absmax = ops.quantize_blockwise(absmax - offset)
        nested = NestedState(nested_absmax, dynamic_map(device), offset.item())
    return packed, absmax, nested


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("K,blocksize", K_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_4bit_matches_reference(kernel_device, quant_type, double_quant, M, K, blocksize, dtype):
    N = 17
    packed, absmax, nested = _quantized(N, K, quant_type, blocksize, double_quant, kernel_device)
    x = torch.randn(M, K, device=kernel_device).to(dtype)
    bias = torch.randn(N, device=kernel_device).to(dtype)
    out = ops.linear_4bit(x, packed, absmax, blocksize, quant_type, (N, K), bias, nested)
    ref = reference.linear_4bit(x, packed, absmax, blocksize, quant_type, (N, K), bias, nested)
    exact = linear_4bit_exact(x, packed, absmax, blocksize, quant_type, (N, K), nested, bias)
    assert_close_to_exact(out, ref, exact, f"linear_4bit M={M} K={K}")


@pytest.mark.parametrize("op", ["linear_4bit", "int8_weight_linear"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("N, K, M", [(600, 2048, 40), (40, 128, 400), (40, 100, 400)])
def test_many_rows_over_several_weight_slabs(kernel_device, monkeypatch, op, threads, mode, N, K, M):
    # The slab GEMM path (the portable kernels' many-rows path; with AVX-512 the panel GEMM runs instead, and
    # must agree) gives each thread a share of the weight rows and decodes it in slabs of 4 x the size of x
    # (600 x 2048 at 40 rows: shares of 200 or 600 rows, in equal slabs of at most 160); a weight that fits one
    # slab, with 128 rows of x or more per thread (40 x 128 at 400 rows), is decoded whole by every thread, each
    # taking a share of x's rows. The worker threads' ATen calls must run in the caller's mode (an
    # inference-mode output cannot be written outside inference mode). AMX is off unless a lower path is forced.
    if os.environ.get("LOWBIT_CPU_ISA") in (None, "native"):
        monkeypatch.setenv("LOWBIT_CPU_ISA", "avx512")
    x = torch.randn(M, K, device=kernel_device)
    W = torch.randn(N, K, device=kernel_device)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with cpu_threads(threads):
        with context():
            if op == "linear_4bit":
                packed, absmax = ops.quantize_4bit(W, 64, "nf4")
                out = ops.linear_4bit(x, packed, absmax, 64, "nf4", (N, K))
                ref = reference.linear_4bit(x, packed, absmax, 64, "nf4", (N, K))
                Wq = reference.dequantize_4bit(packed, absmax, 64, "nf4", (N, K), torch.float64)
            else:
                CB, SCB, _ = reference.int8_vectorwise_quant(W, 0.0)
                out, ref = ops.int8_weight_linear(x, CB, SCB), reference.int8_weight_linear(x, CB, SCB)
                Wq = CB.double() * (SCB.double() / 127).unsqueeze(1)
    assert_close_to_exact(out, ref, x.double() @ Wq.t(), f"{op} {N}x{K} at {M} rows ({threads} threads, {mode})")


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("M", [2, 3, 5, 6, 7, 8, 13, 15])
@pytest.mark.parametrize("N, K", [(17, 64), (40, 576)])
def test_linear_4bit_gemv_row_groups(monkeypatch, isa, M, N, K):
    # Up to 15 rows the GEMV passes over each weight row once per 8 rows of x on AVX-512 (13 rows: 8 + 5), once per
    # 4 on AVX2 (13 rows: 4 + 4 + 4 + 1), with 4, 2 or 1 chains of sums per row.
    force_cpu_isa(monkeypatch, isa)
    packed, absmax, _ = _quantized(N, K, "nf4", 64, False)
    x = torch.randn(M, K)
    out = ops.linear_4bit(x, packed, absmax, 64, "nf4", (N, K))
    ref = reference.linear_4bit(x, packed, absmax, 64, "nf4", (N, K))
    exact = linear_4bit_exact(x, packed, absmax, 64, "nf4", (N, K))
    assert_close_to_exact(out, ref, exact, f"linear_4bit GEMV M={M} N={N} K={K}")


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(
    "M, N, K, blocksize",
    [(16, 17, 64, 64), (17, 5, 32, 32), (40, 33, 160, 32), (64, 200, 576, 64), (100, 48, 1024, 256),
     (29, 1025, 384, 128)],
)  # fmt: skip
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_linear_4bit_panel_gemm(monkeypatch, isa, threads, double_quant, M, N, K, blocksize):
    # From 16 rows on AVX-512 CPUs the weight is decoded in panels of 32 rows and x passes over each in tiles of at
    # most 12 rows, summing 128 k at a time. Tails everywhere: panels with 5, 17 or 1 valid rows (masked stores, the
    # other half of the panel empty), tiles of 10-12 rows, K not a multiple of the 128-long sums, blocks of 32 (a new
    # scale every 32 k) up to 256; with 3 threads and fewer panels than threads, x's tiles are split into groups.
    # AVX2's panels are 16 rows and its tiles 6 (tails of 1, 9 or 16 rows; 1025 = 64 x 16 + 1).
    force_cpu_isa(monkeypatch, isa)
    packed, absmax, nested = _quantized(N, K, "nf4", blocksize, double_quant)
    x = torch.randn(M, K)
    with cpu_threads(threads):
        out = ops.linear_4bit(x, packed, absmax, blocksize, "nf4", (N, K), None, nested)
    ref = reference.linear_4bit(x, packed, absmax, blocksize, "nf4", (N, K), None, nested)
    exact = linear_4bit_exact(x, packed, absmax, blocksize, "nf4", (N, K), nested)
    assert_close_to_exact(out, ref, exact, f"linear_4bit panel GEMM M={M} N={N} K={K}")


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("M, N, K", [(17, 5, 16), (40, 33, 100), (29, 64, 7), (100, 48, 1031)])
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_int8_weight_linear_panel_gemm(monkeypatch, isa, threads, M, N, K):
    # Without AMX (forced off here), beyond 16 rows the int8 weight takes the panel GEMM: K not a multiple of 16
    # (AVX-512) or 8 (AVX2) (the panel decode's scalar tail; K = 7 is all tail), panels of 5, 33 (1 + 32) and 48
    # (16 + 32) rows.
    force_cpu_isa(monkeypatch, isa)
    CB, SCB, _ = reference.int8_vectorwise_quant(torch.randn(N, K), 0.0)
    x = torch.randn(M, K)
    with cpu_threads(threads):
        out = ops.int8_weight_linear(x, CB, SCB)
    ref = reference.int8_weight_linear(x, CB, SCB)
    exact = x.double() @ (CB.double() * (SCB.double() / 127).unsqueeze(1)).t()
    assert_close_to_exact(out, ref, exact, f"int8_weight_linear panel GEMM M={M} N={N} K={K}")


@pytest.mark.parametrize("M, N, K", [(9, 40, 64), (40, 33, 100), (100, 192, 576), (17, 1024, 1024), (40, 300, 4099),
                                     (100, 2048, 520)])  # fmt: skip
@pytest.mark.parametrize("scales", ["normal", "wide", "out of the tile range"])
def test_int8_weight_linear_many_rows(kernel_device, M, N, K, scales):
    # Beyond 8 rows the AMX-BF16 kernel runs where the CPU has one (x split into three bfloat16 parts), with tails in
    # every dimension: small weights held whole by every thread (40 x 33, 100 x 192), larger ones split by rows. A
    # value beyond its exact range (|x| < 2^-96) makes it decline and the slab path run instead. Either way the error
    # stays within the reference's.
    x = torch.randn(M, K, device=kernel_device)
    if scales == "wide":
        x *= torch.logspace(-20, 20, K, device=kernel_device)
    elif scales == "out of the tile range":
        x[3, 5] = 1e-35
    W = torch.randn(N, K, device=kernel_device)
    CB, SCB, _ = reference.int8_vectorwise_quant(W, 0.0)
    out, ref = ops.int8_weight_linear(x, CB, SCB), reference.int8_weight_linear(x, CB, SCB)
    exact = x.double() @ (CB.double() * (SCB.double() / 127).unsqueeze(1)).t()
    assert_close_to_exact(out, ref, exact, f"int8_weight_linear M={M} N={N} K={K} {scales}")


@pytest.mark.parametrize("isa", ["native", "avx512"])
def test_int8_weight_linear_paths_agree(monkeypatch, isa):
    # LOWBIT_CPU_ISA=avx512 keeps the AVX-512 kernels but not AMX: both paths against the exact product.
    monkeypatch.setenv("LOWBIT_CPU_ISA", isa)
    x, W = torch.randn(64, 2048), torch.randn(1024, 2048)
    CB, SCB, _ = reference.int8_vectorwise_quant(W, 0.0)
    exact = x.double() @ (CB.double() * (SCB.double() / 127).unsqueeze(1)).t()
    out, ref = ops.int8_weight_linear(x, CB, SCB), reference.int8_weight_linear(x, CB, SCB)
    assert_close_to_exact(out, ref, exact, f"int8_weight_linear ({isa})")


def test_linear_4bit_batched_input_shape(device):
    packed, absmax, _ = _quantized(8, 64, "nf4", 64, False, device)
    x = torch.randn(2, 3, 64, device=device)
    out = ops.linear_4bit(x, packed, absmax, 64, "nf4", (8, 64))
    assert out.shape == (2, 3, 8)
    assert torch.equal(out, ops.linear_4bit(x.reshape(6, 64), packed, absmax, 64, "nf4", (8, 64)).reshape(2, 3, 8))


def test_linear_4bit_empty_batch_and_zero_features(device):
    packed, absmax, _ = _quantized(8, 64, "nf4", 64, False, device)
    assert ops.linear_4bit(torch.randn(0, 64, device=device), packed, absmax, 64, "nf4", (8, 64)).shape == (0, 8)
    p0, a0 = ops.quantize_4bit(torch.empty(0, device=device), 64, "nf4")
    assert p0.shape == (0, 1) and a0.shape == (0,)


def test_linear_4bit_gradient_matches_reference(device):
    packed, absmax, nested = _quantized(9, 128, "nf4", 64, True, device)
    x = torch.randn(3, 128, device=device, requires_grad=True)
    bias = torch.randn(9, device=device, requires_grad=True)
    upstream = torch.randn(3, 9, device=device)  # a linear loss: the gradient does not depend on forward rounding
    ops.linear_4bit(x, packed, absmax, 64, "nf4", (9, 128), bias, nested).backward(upstream)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = bias.detach().clone().requires_grad_()
    reference.linear_4bit(x_ref, packed, absmax, 64, "nf4", (9, 128), b_ref, nested).backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, b_ref.grad)


# -- int8 ----------------------------------------------------------------------------------------


def _with_outliers(M, K, dtype, device="cpu"):
    x = torch.randn(M, K)
    if K > 3:
        x[:, 3] = 20.0  # a whole outlier column
        x[0, K - 1] = -9.0  # a single outlier element
    return x.to(device, dtype)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("M", SIZES)
@pytest.mark.parametrize("K", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_vectorwise_quant_matches_reference(kernel_device, threshold, M, K, dtype):
    x = _with_outliers(M, K, dtype, kernel_device)
    q, stats, cols = ops.int8_vectorwise_quant(x, threshold)
    ref_q, ref_stats, ref_cols = reference.int8_vectorwise_quant(x, threshold)
    assert torch.equal(q, ref_q) and torch.equal(stats, ref_stats) and torch.equal(cols, ref_cols)
    if threshold and K > 3:
        assert 3 in cols.tolist() and (q[:, cols] == 0).all()


@pytest.mark.parametrize("M", [1, 5, 8, 17])
@pytest.mark.parametrize("K", SIZES + [4096])
def test_int8_mm_is_exact(kernel_device, M, K):
    A = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=kernel_device)
    B = torch.randint(-127, 128, (33, K), dtype=torch.int8, device=kernel_device)
    assert torch.equal(ops.int8_mm(A, B), reference.int8_mm(A, B))


@pytest.mark.skipif(ARCH != "x86_64", reason="oneDNN's ISA cap names x86 levels")
def test_int8_mm_is_exact_where_onednn_lacks_vnni():
    # at::_int_mm's oneDNN kernels without VNNI saturate int16 pair sums and return wrong products, so there lowbit
    # runs its own GEMM beyond 8 rows (on AVX2; the float GEMM on the portable level). A fresh process with oneDNN
    # capped below VNNI (it reads the cap once) makes every CPU such a CPU. lowbit's vpmaddwd GEMM: panels of 16
    # weight rows (tails of 1, 7 and 1 + 16), tiles of at most 6 rows of x split evenly (13 rows: 4 + 4 + 5), pairs
    # of k with an odd K's missing partner, the 16-k packing's scalar tail, and int8's extremes (-128 * -128 pairs),
    # all exact, with 1 and 3 threads.
    script = """
import os, torch, lowbit
from lowbit import ops, reference
a = torch.full((64, 256), 127, dtype=torch.int8)
assert not torch.equal(torch._int_mm(a, a.t().contiguous()), torch.full((64, 64), 127 * 127 * 256, dtype=torch.int32)), \
    "oneDNN's _int_mm is exact without VNNI here: this test no longer reaches lowbit's own GEMM"
for isa in ("native", "avx2", "portable"):
    os.environ["LOWBIT_CPU_ISA"] = isa
    for threads in (1, 3):
        torch.set_num_threads(threads)
        for M in (9, 13, 40, 512):
            for N in (1, 7, 16, 17, 33):
                for K in (1, 15, 16, 17, 100, 1025):
                    A = torch.randint(-128, 128, (M, K), dtype=torch.int8)
                    B = torch.randint(-128, 128, (N, K), dtype=torch.int8)
                    A[0], B[0], A[-1, : K // 2], B[-1, : K // 2] = -128, -128, 127, 127
                    assert torch.equal(ops.int8_mm(A, B), reference.int8_mm(A, B)), (isa, threads, M, N, K)
"""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_cpu_isa_is_chosen_by_the_environment(monkeypatch):
    # LOWBIT_CPU_ISA caps the level at what the CPU has; a name lowbit does not know, or a level of another
    # architecture, is refused.
    monkeypatch.delenv("LOWBIT_CPU_ISA", raising=False)  # the whole suite may run with a level forced
    native = torch.ops.lowbit.cpu_isa()
    levels = CPU_LEVELS
    for isa in levels:
        monkeypatch.setenv("LOWBIT_CPU_ISA", isa)
        assert torch.ops.lowbit.cpu_isa() == levels[min(levels.index(isa), levels.index(native))]
        assert lowbit.cpu_isa()["isa"] == torch.ops.lowbit.cpu_isa() and lowbit.cpu_isa()["paths"]
    for unknown in ["avx3", "neon" if "avx2" in levels else "avx2"]:
        monkeypatch.setenv("LOWBIT_CPU_ISA", unknown)
        with pytest.raises(ValueError, match=f"LOWBIT_CPU_ISA={unknown} is not a CPU path lowbit has on this arch"):
            ops.linear_4bit(torch.randn(1, 64), *ops.quantize_4bit(torch.randn(8, 64), 64, "nf4"), 64, "nf4", (8, 64))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("M", [1, 4, 17])
@pytest.mark.parametrize("K", SIZES + [1024])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_matches_reference(kernel_device, threshold, M, K, dtype):
    N = 33
    CB, SCB, _ = reference.int8_vectorwise_quant(torch.randn(N, K, device=kernel_device), 0.0)
    x = _with_outliers(M, K, dtype, kernel_device)
    bias = torch.randn(N, device=kernel_device).to(dtype)
    out = ops.int8_linear(x, CB, SCB, threshold, bias)
    ref = reference.int8_linear(x, CB, SCB, threshold, bias)
    assert_close_to_exact(out, ref, int8_linear_exact(x, CB, SCB, threshold, bias), f"int8_linear M={M} K={K}")


@pytest.mark.parametrize("M", [1, 4, 17, 65])  # the GEMV kernels up to 16 rows, the slab GEMM beyond
@pytest.mark.parametrize("K", SIZES + [1024])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_weight_linear_matches_reference(kernel_device, M, K, dtype):
    N = 33
    CB, SCB, _ = reference.int8_vectorwise_quant(torch.randn(N, K, device=kernel_device), 0.0)
    x = torch.randn(M, K, device=kernel_device).to(dtype)
    bias = torch.randn(N, device=kernel_device).to(dtype)
    out = ops.int8_weight_linear(x, CB, SCB, bias)
    ref = reference.int8_weight_linear(x, CB, SCB, bias)
    exact = x.double() @ (CB.double() * SCB.double().unsqueeze(1) / 127).t() + bias.double()
    assert_close_to_exact(out, ref, exact, f"int8_weight_linear M={M} K={K}")


def test_int8_linear_gradient(device):
    CB, SCB, _ = reference.int8_vectorwise_quant(torch.randn(7, 32, device=device), 0.0)
    x = torch.randn(2, 32, device=device, requires_grad=True)
    ops.int8_linear(x, CB, SCB, 6.0).sum().backward()
    expected = (CB.float() * (SCB / 127).unsqueeze(1)).sum(0).expand(2, 32)
    torch.testing.assert_close(x.grad, expected)


# -- opcheck: schemas, fake kernels, autograd registration, dynamic shapes -------------------------


@pytest.mark.parametrize("case", range(len(op_cases())))
def test_opcheck(device, case):
    op, args = op_cases(device)[case]
    torch.library.opcheck(op, args)


def test_opcheck_int8_quant_with_outliers(device):
    # The number of outlier columns is data-dependent: the fake kernel returns an unbacked size.
    # aot_dispatch_dynamic cannot trace data-dependent sizes, so check the other utilities.
    x = _with_outliers(4, 16, torch.float32, device)
    torch.library.opcheck(torch.ops.lowbit.int8_vectorwise_quant, (x, 6.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))  # fmt: skip


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op,call,error,match",
    [
        ("quantize_4bit", lambda: ops.quantize_4bit(torch.randn(64), 48), ValueError, "blocksize must be a power of two"),
        ("quantize_4bit", lambda: ops.quantize_4bit(torch.randn(64), 8192), ValueError, "blocksize"),
        ("quantize_4bit", lambda: ops.quantize_4bit(torch.randn(64), 64, "nf5"), ValueError, "quant_type"),
        ("quantize_4bit", lambda: ops.quantize_4bit(torch.arange(64), 64), TypeError, "float32, float16 or bfloat16"),
        ("quantize_4bit", lambda: ops.quantize_4bit(torch.tensor([1.0, float("nan")] * 32), 64), ValueError, "NaN or Inf"),
        ("quantize_4bit", lambda: ops.quantize_4bit(torch.tensor([1.0, float("inf")] * 32), 64), ValueError, "NaN or Inf"),
        ("quantize_blockwise", lambda: ops.quantize_blockwise(torch.tensor([float("nan")] * 8)), ValueError, "NaN or Inf"),
        ("quantize_blockwise", lambda: ops.quantize_blockwise(torch.randn(8), torch.randn(256)), ValueError, "sorted"),
        ("quantize_blockwise", lambda: ops.quantize_blockwise(torch.randn(8), torch.randn(255).sort().values), ValueError, "255 elements"),
        ("dequantize_4bit", lambda: ops.dequantize_4bit(torch.zeros(10, 1, dtype=torch.uint8), torch.ones(1), 64, "nf4", (4, 8)),
         ValueError, "packed has 10 elements, expected 16"),
        ("dequantize_4bit", lambda: ops.dequantize_4bit(torch.zeros(16, 1, dtype=torch.uint8), torch.ones(2), 64, "nf4", (4, 8)),
         ValueError, "absmax has 2 elements"),
        ("dequantize_4bit", lambda: ops.dequantize_4bit(torch.zeros(16, 1, dtype=torch.uint8), torch.ones(1, dtype=torch.float64), 64,
                                     "nf4", (4, 8)), TypeError, "absmax must be Float"),
        ("dequantize_4bit", lambda: ops.dequantize_4bit(torch.zeros(16, 1, dtype=torch.uint8), torch.ones(1), 64, "nf4", (4, 8),
                                     torch.int32), TypeError, "output dtype"),
        ("linear_4bit", lambda: ops.linear_4bit(torch.randn(2, 63), *ops.quantize_4bit(torch.randn(8, 64)), 64, "nf4", (8, 64)),
         ValueError, r"x has 63 features but the weight is \[8, 64\]"),
        ("linear_4bit", lambda: ops.linear_4bit(torch.randn(2, 64), ops.quantize_4bit(torch.randn(8, 64))[0], torch.ones(7), 64,
                                 "nf4", (8, 64)), ValueError, "absmax has 7 elements"),
        ("linear_4bit", lambda: ops.linear_4bit(torch.randn(2, 64), ops.quantize_4bit(torch.randn(8, 64))[0],
                                 torch.zeros(8, dtype=torch.uint8), 64, "nf4", (8, 64)), ValueError, "needs nested_absmax"),
        ("linear_4bit", lambda: ops.linear_4bit(torch.randn(2, 64), *ops.quantize_4bit(torch.randn(8, 64)), 64, "nf4", (8, 64),
                                 torch.randn(9)), ValueError, "bias must have shape"),
        ("int8_mm", lambda: ops.int8_mm(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8)), ValueError,
         "same last dimension"),
        ("int8_mm", lambda: ops.int8_mm(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int8)), TypeError, "A must be Char"),
        ("int8_linear", lambda: ops.int8_linear(torch.randn(2, 5), torch.zeros(3, 4, dtype=torch.int8), torch.ones(3)), ValueError,
         "x has 5 features but the weight expects 4"),
        ("int8_linear", lambda: ops.int8_linear(torch.randn(2, 4), torch.zeros(3, 4, dtype=torch.int8), torch.ones(2)), ValueError,
         "SCB has 2 elements"),
        ("int8_weight_linear", lambda: ops.int8_weight_linear(torch.randn(2, 5), torch.zeros(3, 4, dtype=torch.int8),
                                                              torch.ones(3)), ValueError, "x has 5 features"),
        ("int8_weight_linear", lambda: ops.int8_weight_linear(torch.randn(2, 4), torch.zeros(3, 4), torch.ones(3)),
         TypeError, r"weight \(CB\) must be Char"),
        ("int8_linear", lambda: ops.int8_linear(torch.randn(2, 4), torch.zeros(3, 4, dtype=torch.int8), torch.ones(3), -1.0),
         ValueError, "threshold must be finite"),
        ("int8_vectorwise_quant", lambda: ops.int8_vectorwise_quant(torch.zeros(2, 3, dtype=torch.int32)), TypeError, "A must be float32"),
    ],
)  # fmt: skip
def test_bad_input_raises_clear_error(device, op, call, error, match):
    # Every device's kernel calls the same validator (csrc/validate.cpp): same exceptions, same messages.
    if device not in native_devices(op):
        pytest.skip(f"no native {op} kernel on {device} (the reference fallback runs, with lighter checks)")
    with torch.device(device), pytest.raises(error, match=match):
        call()


def test_tensors_on_another_device_are_refused():
    x = torch.randn(2, 64, device="meta")
    with pytest.raises(ValueError, match="is on cpu but the input is on meta"):
        ops.linear_4bit(x, *ops.quantize_4bit(torch.randn(8, 64)), 64, "nf4", (8, 64))


def test_non_contiguous_inputs_are_handled(device):
    with torch.device(device):
        W = torch.randn(64, 32).t()  # non-contiguous
        packed, absmax = ops.quantize_4bit(W, 64, "nf4")
        assert torch.equal(packed, ops.quantize_4bit(W.contiguous(), 64, "nf4")[0])
        x = torch.randn(64, 3).t()
        out = ops.linear_4bit(x, packed, absmax, 64, "nf4", (32, 64))
        assert torch.equal(out, ops.linear_4bit(x.contiguous(), packed, absmax, 64, "nf4", (32, 64)))


def test_library_is_loaded_from_build_info():
    info = lowbit.build_info()
    assert info["torch"] == torch.__version__ and info["version"] == lowbit.__version__
    assert isinstance(info["cuda"], bool)


def test_int8_linear_propagates_nan_like_float_linear(device):
    with torch.device(device):
        CB, SCB, _ = reference.int8_vectorwise_quant(torch.randn(8, 64), 0.0)
        for threshold in (0.0, 6.0):
            x = torch.randn(3, 64)
            x[1, 5] = float("nan")
            out = ops.int8_linear(x, CB, SCB, threshold)
            assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
            ref = reference.int8_linear(x, CB, SCB, threshold)
            assert torch.equal(out.isnan(), ref.isnan())
        x = torch.randn(2, 64)
        x[0, 9] = float("inf")  # an outlier with a threshold (goes through float), poison without one
        assert not ops.int8_linear(x, CB, SCB, 6.0)[1].isnan().any()
        assert ops.int8_linear(x, CB, SCB, 0.0)[0].isnan().all()


def test_int8_quant_of_a_nan_in_another_rows_outlier_column_matches_reference(device):
    # Column 5 is an outlier column because of row 0; row 1's NaN there is still a NaN, not an outlier.
    x = torch.randn(3, 64, device=device)
    x[0, 5], x[1, 5], x[2, 7] = 50.0, float("nan"), float("inf")
    out, ref = ops.int8_vectorwise_quant(x, 6.0), reference.int8_vectorwise_quant(x, 6.0)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])
    assert torch.equal(out[1].isnan(), ref[1].isnan()) and torch.equal(out[1].nan_to_num(), ref[1].nan_to_num())
    assert out[1][1].isnan() and out[1][2].isfinite()  # the Inf is an outlier element: computed in float


def test_int8_quant_subnormal_rows_match_reference(device):
    with torch.device(device):
        x = torch.full((2, 16), 1e-40)
        x[1] = torch.randn(16)
        assert torch.equal(ops.int8_vectorwise_quant(x)[0], reference.int8_vectorwise_quant(x)[0])
        assert (ops.int8_vectorwise_quant(x)[0][0] == 127).all()


def test_fake_int8_quant_with_zero_features(device):
    with torch.device(device):
        torch.library.opcheck(torch.ops.lowbit.int8_vectorwise_quant, (torch.randn(5, 0), 0.0))


def test_int8_mm_refuses_k_that_could_overflow(device):
    if device not in native_devices("int8_mm"):
        pytest.skip(f"no native int8_mm kernel on {device} (the reference fallback runs, with lighter checks)")
    A = torch.zeros(1, 133_200, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="overflow the int32 accumulator"):
        ops.int8_mm(A, A)


def test_import_refuses_a_library_built_for_another_torch(monkeypatch):
    from lowbit import _native

    real = _native.build_info
    monkeypatch.setattr(_native, "build_info", lambda: {**real(), "torch": "1.0.0"})
    with pytest.raises(ImportError, match=r"built against torch 1.0.0 but torch .* is installed.*Rebuild"):
        _native.load()
