"""Property-based fuzzing of every op against its reference (hypothesis): random shapes (empty and odd ones
included), dtypes, blocksizes, quant types, value scales from subnormal to huge, both CPU kernel paths.

Derandomized, so every run draws the same cases (a failure reproduces as is) and hypothesis keeps no
database; FUZZ_EXAMPLES cases per op. Quantizers must match the reference bit for bit; the linear ops must
stay within the textbook forward-error bound of a dot product (Higham): |out - exact| <= (K + 2) * u *
sum_k |x_k w_k| (+ the final rounding to the output dtype), u the unit roundoff of float32 for the kernels
(they compute in float32) and of the input dtype for the reference."""

import os
from contextlib import contextmanager

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers import LOWER_CPU_LEVELS

from lowbit import ops, reference
from lowbit.fallback import REFERENCE_KERNELS
from lowbit.formats import NestedState, dynamic_map

FUZZ_EXAMPLES = 1000
FUZZ = settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Largest power of ten a dtype holds with room for a block of values around it.
MAX_EXPONENT = {torch.float32: 36, torch.float16: 3, torch.bfloat16: 36}
EPS32 = torch.finfo(torch.float32).eps

blocksizes = st.sampled_from([32, 64, 128, 256, 512, 1024, 4096])
quant_types = st.sampled_from(["nf4", "fp4"])
dtypes = st.sampled_from(DTYPES)
isas = st.sampled_from(["native", *LOWER_CPU_LEVELS])
seeds = st.integers(0, 2**31 - 1)


@contextmanager
def cpu_kernels(isa):
    """The CPU's best kernels, or a lower level's (the AVX2 or NEON ones, or lower on a CPU without them; the
    portable ones)."""
    before = os.environ.get("LOWBIT_CPU_ISA")
    os.environ["LOWBIT_CPU_ISA"] = isa
    try:
        yield
    finally:
        os.environ.pop("LOWBIT_CPU_ISA") if before is None else os.environ.__setitem__("LOWBIT_CPU_ISA", before)


def values(shape, dtype, seed, exponent=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 10.0**exponent).to(dtype)


@st.composite
def scaled(draw, shape):
    """(tensor, dtype) of normal values times a power of ten the dtype holds (subnormal to near-max)."""
    dtype = draw(dtypes)
    exponent = draw(st.integers(-40 if dtype != torch.float16 else -6, MAX_EXPONENT[dtype]))
    return values(shape, dtype, draw(seeds), exponent), dtype


@FUZZ
@given(n=st.integers(0, 300), blocksize=blocksizes, quant_type=quant_types, isa=isas, data=st.data())
def test_quantize_4bit(n, blocksize, quant_type, isa, data):
    A, _ = data.draw(scaled((n,)))
    with cpu_kernels(isa):
        out = ops.quantize_4bit(A, blocksize, quant_type)
    ref = reference.quantize_4bit(A, blocksize, quant_type)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


@FUZZ
@given(rows=st.integers(1, 4), k=st.integers(0, 150), blocksize=blocksizes, quant_type=quant_types, isa=isas,
       weighted=st.booleans(), ratios=st.lists(st.floats(0.0625, 4.0, width=32), min_size=1, max_size=6),
       data=st.data())  # fmt: skip
def test_quantize_4bit_search(rows, k, blocksize, quant_type, isa, weighted, ratios, data):
    A, _ = data.draw(scaled((rows, k)))
    importance = None
    if weighted:  # zeros, and weights from tiny to large
        importance = values((k,), torch.float32, data.draw(seeds), data.draw(st.integers(-30, 30))).abs()
        importance[::3] = 0
    with cpu_kernels(isa):
        out = ops.quantize_4bit_search(A, blocksize, quant_type, ratios, importance)
    ref = reference.quantize_4bit_search(A, blocksize, quant_type, ratios, importance)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


@FUZZ
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=3), blocksize=blocksizes, quant_type=quant_types,
       dtype=dtypes, seed=seeds)  # fmt: skip
def test_dequantize_4bit(shape, blocksize, quant_type, dtype, seed):
    n = torch.Size(shape).numel()
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-n // blocksize), generator=g) * 10.0 ** torch.randint(-30, 30, (1,), generator=g).item()
    out = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)
    assert torch.equal(out, reference.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype))


@FUZZ
@given(n=st.integers(0, 700), blocksize=blocksizes, data=st.data())
def test_quantize_blockwise(n, blocksize, data):
    A, _ = data.draw(scaled((n,)))
    out = ops.quantize_blockwise(A, blocksize=blocksize)
    ref = reference.quantize_blockwise(A, blocksize=blocksize)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


@FUZZ
@given(n=st.integers(0, 700), blocksize=blocksizes, dtype=dtypes, seed=seeds)
def test_dequantize_blockwise(n, blocksize, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-n // blocksize), generator=g) * 10.0 ** torch.randint(-30, 30, (1,), generator=g).item()
    out = ops.dequantize_blockwise(A, absmax, blocksize=blocksize, dtype=dtype)
    assert torch.equal(out, reference.dequantize_blockwise(A, absmax, blocksize=blocksize, dtype=dtype))


def assert_within_dot_bound(out, exact, magnitude, K, eps, what):
    """Within the forward-error bound of a K-term dot product computed with unit roundoff `eps`, plus the
    final rounding to out's dtype: relative for normal results, the subnormal spacing below them."""
    out_type = torch.finfo(out.dtype)
    final_rounding = out_type.eps * exact.abs() + out_type.smallest_normal * out_type.eps
    bound = (K + 2) * eps * magnitude + final_rounding
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), f"{what}: error {err.max():.3g} beyond the bound at {(err - bound).argmax()}"


@FUZZ
@given(M=st.integers(0, 9), K=st.integers(0, 130), N=st.integers(0, 20), blocksize=st.sampled_from([32, 64, 128]),
       quant_type=quant_types, double_quant=st.booleans(), dtype=dtypes, bias=st.booleans(), isa=isas, seed=seeds)
def test_linear_4bit(M, K, N, blocksize, quant_type, double_quant, dtype, bias, isa, seed):  # fmt: skip
    W = values((N, K), torch.float32, seed)
    packed, absmax = ops.quantize_4bit(W, blocksize, quant_type)
    nested = None
    if double_quant:
        offset = absmax.mean() if absmax.numel() else torch.zeros(())
        absmax, nested_absmax = ops.quantize_blockwise(absmax - offset)
        nested = NestedState(nested_absmax, dynamic_map(), offset.item())
    x = values((M, K), dtype, seed + 1)
    b = values((N,), dtype, seed + 2) if bias else None
    with cpu_kernels(isa):
        out = ops.linear_4bit(x, packed, absmax, blocksize, quant_type, (N, K), b, nested)
    ref = reference.linear_4bit(x, packed, absmax, blocksize, quant_type, (N, K), b, nested)
    scales = absmax if nested is None else nested.decode(absmax)
    Wq = reference.dequantize_4bit(packed, scales, blocksize, quant_type, (N, K), torch.float64)
    bias64 = torch.zeros(N, dtype=torch.float64) if b is None else b.double()
    exact = x.double() @ Wq.t() + bias64
    magnitude = x.double().abs() @ Wq.abs().t() + bias64.abs()
    assert out.shape == ref.shape == (M, N) and out.dtype == ref.dtype == dtype
    # The kernels compute in float32 whatever the input dtype; the reference in the input's dtype.
    assert_within_dot_bound(out, exact, magnitude, K, EPS32, f"linear_4bit kernel M={M} K={K} N={N}")
    assert_within_dot_bound(ref, exact, magnitude, K, torch.finfo(dtype).eps, f"linear_4bit reference M={M} K={K}")


@st.composite
def activations(draw, max_rows=9, max_k=130):
    """x [M, K] with, sometimes, outlier columns and single outliers well above the threshold."""
    M, K = draw(st.integers(0, max_rows)), draw(st.integers(0, max_k))
    dtype, seed = draw(dtypes), draw(seeds)
    x = values((M, K), torch.float32, seed, draw(st.integers(-3, 1)))
    if K and M and draw(st.booleans()):
        g = torch.Generator().manual_seed(seed)
        x[:, torch.randint(0, K, (1,), generator=g).item()] = 20.0
        x[torch.randint(0, M, (1,), generator=g).item(), torch.randint(0, K, (1,), generator=g).item()] = -9.0
    return x.to(dtype)


@FUZZ
@given(x=activations(), threshold=st.sampled_from([0.0, 6.0, 0.5, 100.0]))
def test_int8_vectorwise_quant(x, threshold):
    out = ops.int8_vectorwise_quant(x, threshold)
    ref = reference.int8_vectorwise_quant(x, threshold)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


@FUZZ
@given(M=st.integers(0, 20), N=st.integers(0, 20), K=st.integers(0, 300), isa=isas, seed=seeds)
def test_int8_mm(M, N, K, isa, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    B = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    with cpu_kernels(isa):
        out = ops.int8_mm(A, B)
    assert torch.equal(out, (A.long() @ B.long().t()).int())
    assert torch.equal(reference.int8_mm(A, B), out)


@FUZZ
@given(x=activations(), N=st.integers(0, 20), threshold=st.sampled_from([0.0, 6.0]), bias=st.booleans(), isa=isas,
       seed=seeds)  # fmt: skip
def test_int8_linear(x, N, threshold, bias, isa, seed):
    K = x.shape[1]
    CB, SCB, _ = reference.int8_vectorwise_quant(values((N, K), torch.float32, seed), 0.0)
    b = values((N,), x.dtype, seed + 1) if bias else None
    with cpu_kernels(isa):
        out = ops.int8_linear(x, CB, SCB, threshold, b)
    ref = reference.int8_linear(x, CB, SCB, threshold, b)
    # The float64 truth of the same algorithm: the same int8 activations, exact accumulation and scaling.
    q, stats, cols = reference.int8_vectorwise_quant(x, threshold)
    w = CB.double() * SCB.double().unsqueeze(1) / 127
    bias64 = torch.zeros(N, dtype=torch.float64) if b is None else b.double()
    x_out, w_out = x[:, cols].double(), w[:, cols]
    exact = (q.double() @ w.t()) * stats.double().unsqueeze(1) / 127 + x_out @ w_out.t() + bias64
    magnitude = (q.double().abs() @ w.abs().t()) * stats.double().unsqueeze(1) / 127 + x_out.abs() @ w_out.abs().t()
    assert out.shape == ref.shape == (*x.shape[:-1], N)
    for name, result in (("kernel", out), ("reference", ref)):  # both compute in float32
        assert_within_dot_bound(result, exact, magnitude + bias64.abs(), K, EPS32, f"int8_linear {name} K={K} N={N}")


@FUZZ
@given(x=activations(), N=st.integers(0, 20), bias=st.booleans(), isa=isas, seed=seeds)
def test_int8_weight_linear(x, N, bias, isa, seed):
    K = x.shape[1]
    CB, SCB, _ = reference.int8_vectorwise_quant(values((N, K), torch.float32, seed), 0.0)
    b = values((N,), x.dtype, seed + 1) if bias else None
    with cpu_kernels(isa):
        out = ops.int8_weight_linear(x, CB, SCB, b)
    ref = reference.int8_weight_linear(x, CB, SCB, b)
    w = CB.double() * SCB.double().unsqueeze(1) / 127
    bias64 = torch.zeros(N, dtype=torch.float64) if b is None else b.double()
    exact = x.double() @ w.t() + bias64
    magnitude = x.double().abs() @ w.abs().t() + bias64.abs()
    assert out.shape == ref.shape == (x.shape[0], N)
    assert_within_dot_bound(out, exact, magnitude, K, EPS32, f"int8_weight_linear kernel K={K} N={N}")
    assert_within_dot_bound(ref, exact, magnitude, K, torch.finfo(x.dtype).eps, f"int8_weight_linear reference K={K}")


def test_every_op_is_fuzzed():
    fuzzed = {name.removeprefix("test_") for name in globals() if name.startswith("test_")} - {"every_op_is_fuzzed"}
    assert fuzzed == set(REFERENCE_KERNELS)
