"""On a CUDA machine: what the device-parametrized op tests cannot show. Layers moved to CUDA and models
loaded there give the CPU's answers; the CUDA linear_4bit's two paths (fused GEMV, dequantize + cuBLAS)
and int8_linear's two paths (dp4a GEMV, cuBLASLt + epilogue) agree with the CPU kernels, with and without
outlier columns; both are captured by CUDA graphs and compiled whole. Ops without a CUDA kernel run
lowbit.reference. Skipped where no GPU is present."""

import pytest
import torch
from helpers import DTYPES, QUANT_TYPES, SIZES, assert_close_to_exact, int8_linear_exact

import lowbit
from lowbit import ops, reference
from lowbit.fallback import native_devices

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_on_cuda_matches_cpu_bytes(quant_type, dtype):
    W = torch.randn(257, 1025).to(dtype)
    cpu = ops.quantize_4bit(W, 64, quant_type)
    gpu = ops.quantize_4bit(W.cuda(), 64, quant_type)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


def test_double_quantization_gives_the_same_bytes_on_cuda_and_cpu():
    """A 1000 x 4096 weight: 64,000 blocks (not a power of two), whose nested offset (their mean) a float32
    reduction would sum in a device-dependent order; lowbit sums it exactly on the host (formats.nested_offset)."""
    lin = torch.nn.Linear(4096, 1000, bias=False)
    cpu = lowbit.Linear4bit.from_linear(lin, double_quant=True).state_dict()
    gpu = lowbit.Linear4bit.from_linear(lin.cuda(), double_quant=True).state_dict()
    assert cpu.keys() == gpu.keys()
    for key, tensor in cpu.items():
        assert torch.equal(tensor, gpu[key].cpu()), key  # the quant_state JSON (nested_offset) included


@pytest.mark.parametrize("make", [
    lambda lin: lowbit.Linear4bit.from_linear(lin, quant_type="nf4", double_quant=True),
    lambda lin: lowbit.Linear8bit.from_linear(lin, threshold=6.0),
])  # fmt: skip
def test_layer_moved_to_cuda_gives_cpu_outputs(make):
    lin = torch.nn.Linear(1024, 96)
    layer = make(lin)
    x = torch.randn(5, 1024)
    x[:, 3] = 20.0
    expected = layer(x)
    moved = layer.to("cuda")
    # Every tensor moves but the quant_state JSON (a uint8 tensor that stays on the CPU, as in bitsandbytes).
    assert all(t.device.type == "cuda" for k, t in moved.state_dict().items() if ".quant_state." not in k)
    torch.testing.assert_close(moved(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_quantize_model_on_cuda():
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    x = torch.randn(4, 256, device="cuda")
    expected = model(x)
    lowbit.quantize_model(model, lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    assert isinstance(model[0], lowbit.Linear4bit) and model[0].weight.is_cuda
    out = model(x)
    assert (out - expected).norm() / expected.norm() < 0.1


def _nf4_layer(k, n, double_quant=True, dtype=torch.bfloat16):
    linear = torch.nn.Linear(k, n, device="cuda", dtype=dtype)
    return lowbit.Linear4bit.from_linear(linear, quant_type="nf4", double_quant=double_quant)


@pytest.mark.parametrize("gemv", ["shuffle", "lds", "v1"])  # LOWBIT_GEMV: the split GEMV's two decodes, the first design
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n", [1024, 1025])  # an odd N leaves the split GEMV's last CTA half its rows
@pytest.mark.parametrize("k", [4096, 1056])  # 1056 = 33 chunks of 32: lanes past the row in the split GEMV
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64])  # the fused GEMV up to 8 rows, dequantize + cuBLAS beyond
def test_linear_4bit_cuda_paths_match_the_cpu_kernel(rows, k, n, double_quant, gemv, monkeypatch):
    monkeypatch.setenv("LOWBIT_GEMV", gemv)
    layer = _nf4_layer(k, n, double_quant=double_quant, dtype=torch.float32)
    x = torch.randn(rows, k)
    expected = layer.to("cpu")(x)
    torch.testing.assert_close(layer.to("cuda")(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_linear_4bit_is_captured_by_a_cuda_graph():
    layer = _nf4_layer(4096, 1024)
    static_x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(static_x)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    fresh = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    static_x.copy_(fresh)
    graph.replay()
    assert torch.equal(static_out, layer(fresh))


def test_linear_4bit_compiles_fullgraph_on_cuda():
    layer = _nf4_layer(4096, 1024)
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_model_loaded_on_cuda_gives_the_cpu_answers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    config = lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    on_cpu = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    on_gpu = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config, device_map="cuda")
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(ids.cuda()).logits.cpu(), on_cpu(ids).logits, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v.cpu(), on_cpu.state_dict()[k]) for k, v in on_gpu.state_dict().items())


# -- LLM.int8() ------------------------------------------------------------------------------------

INT8_OPS = ("int8_vectorwise_quant", "int8_mm", "int8_linear")
# Rows of x: the GEMV (up to 8 rows) and the cuBLASLt + epilogue path beyond, with partial tiles.
INT8_ROWS = [1, 4, 8, 9, 17, 65]


def test_int8_ops_have_native_cuda_kernels():
    if not lowbit.build_info()["cuda"]:
        pytest.skip("this build has no CUDA kernels")
    assert all("cuda" in native_devices(op) for op in INT8_OPS)


def _cuda_kernels_launched(fn) -> list[str]:
    """Names of the CUDA kernels one call of fn launches (after a warm-up call), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("rows", [1, 8])
def test_decode_steps_launch_at_most_two_kernels(rows):
    """A decode call is a handful of launches per layer per token: LLM.int8() with a threshold and a bfloat16
    bias is one activation kernel and the GEMV; a 4-bit layer is the GEMV alone."""
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    x[:, 7] = 20.0  # an outlier column
    CB, SCB, _ = ops.int8_vectorwise_quant(torch.randn(1024, 4096, device="cuda", dtype=torch.float16), 0.0)
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    int8 = _cuda_kernels_launched(lambda: ops.int8_linear(x, CB, SCB, 6.0, bias))
    assert len(int8) <= 2, int8
    layer = _nf4_layer(4096, 1024)
    nf4 = _cuda_kernels_launched(lambda: layer(x))
    assert len(nf4) == 1, nf4


def _activations(M, K, dtype=torch.float32, outlier_columns=(), seed=0):
    """float32 rows on the CPU (then cast to dtype): outlier_columns hold 20.0 in every row, and one element
    of row 0 is a lone outlier (-9.0), so its column is an outlier column through one row only."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
    for k in outlier_columns:
        x[:, k] = 20.0
    if K > 1:
        x[0, K - 1] = -9.0
    return x.to(dtype)


def _int8_weight(N, K, seed=1):
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    CB, SCB, _ = reference.int8_vectorwise_quant(W, 0.0)
    return CB, SCB, torch.randn(N, generator=torch.Generator().manual_seed(seed + 1))


def _assert_int8_linear_matches_cpu(x, CB, SCB, threshold, bias, what):
    """CUDA within the op tests' bound of the float64 truth (twice the reference's own error plus one ulp),
    and as close as the CPU kernel is."""
    bias = bias.to(x.dtype)
    out = ops.int8_linear(x.cuda(), CB.cuda(), SCB.cuda(), threshold, bias.cuda()).cpu()
    exact = int8_linear_exact(x, CB, SCB, threshold, bias)
    assert_close_to_exact(out, reference.int8_linear(x, CB, SCB, threshold, bias), exact, what + " vs reference")
    assert_close_to_exact(out, ops.int8_linear(x, CB, SCB, threshold, bias), exact, what + " vs CPU kernel")


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("M", SIZES)
@pytest.mark.parametrize("K", SIZES + [4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_vectorwise_quant_on_cuda_matches_cpu_bytes(threshold, M, K, dtype):
    x = _activations(M, K, dtype, outlier_columns=[3] if K > 3 else [])
    cpu = ops.int8_vectorwise_quant(x, threshold)
    gpu = ops.int8_vectorwise_quant(x.cuda(), threshold)
    for name, c, g in zip(("codes", "row_stats", "outlier_columns"), cpu, gpu):
        assert torch.equal(c, g.cpu()), name


def test_int8_vectorwise_quant_on_cuda_poisons_rows_like_the_reference():
    # A NaN anywhere, or an Inf without a threshold, poisons its row (codes 0, row stat NaN); with a threshold
    # an Inf is an outlier. (The CPU kernel spares a NaN that sits in another row's outlier column; the
    # reference and CUDA do not: not exercised here.)
    x = _activations(4, 64)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    for threshold in (0.0, 6.0):
        ref = reference.int8_vectorwise_quant(x, threshold)
        gpu = ops.int8_vectorwise_quant(x.cuda(), threshold)
        assert torch.equal(ref[0], gpu[0].cpu()) and torch.equal(ref[2], gpu[2].cpu())
        assert torch.equal(ref[1].isnan(), gpu[1].cpu().isnan())
        torch.testing.assert_close(ref[1], gpu[1].cpu(), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("M, N, K", [
    (1, 33, 17), (17, 1025, 1), (9, 64, 1024), (65, 64, 4096), (1025, 40, 1025), (300, 256, 64), (4, 4, 131068),
])  # fmt: skip
def test_int8_mm_on_cuda_is_exact(M, N, K):
    # cuBLASLt where K and N are multiples of 4, the tiled kernel elsewhere; extreme codes included.
    g = torch.Generator().manual_seed(M * N + K)
    A = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    B = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    A[0, :] = -128
    B[0, :] = -128
    assert torch.equal(ops.int8_mm(A.cuda(), B.cuda()).cpu(), ops.int8_mm(A, B))


def _misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """`t` on the GPU as a view starting `offset` bytes (rounded down to its element size) into a flat buffer, so
    vector loads that assume 16-byte alignment must take their fallback."""
    offset -= offset % t.element_size()
    flat = torch.zeros(offset + t.numel() * t.element_size(), dtype=torch.uint8, device="cuda")
    flat[offset:] = t.contiguous().view(-1).view(torch.uint8).cuda()
    return flat[offset:].view(t.dtype).view(t.shape)


@pytest.mark.parametrize("offset", [1, 2, 3, 4, 7, 8, 12, 15])
def test_kernels_on_cuda_take_misaligned_views(offset):
    # (A[1:] of an [18, 64] int8 tensor starts 64 bytes in: aligned. These start 1-15 bytes in.)
    A = torch.randint(-128, 128, (17, 1040), dtype=torch.int8)
    B = torch.randint(-128, 128, (33, 1040), dtype=torch.int8)
    assert torch.equal(ops.int8_mm(_misaligned(A, offset), _misaligned(B, offset)).cpu(), ops.int8_mm(A, B))
    CB, SCB, bias = _int8_weight(33, 1040)
    for M in (1, 9):
        x = _activations(M, 1040, torch.float32, outlier_columns=[3])
        expected = ops.int8_linear(x, CB, SCB, 6.0, bias)
        got = ops.int8_linear(_misaligned(x, offset), _misaligned(CB, offset), SCB.cuda(), 6.0, bias.cuda())
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
        W = torch.randn(48, 1024)
        packed, absmax = ops.quantize_4bit(W, 64, "nf4")
        expected = ops.linear_4bit(x[:, :1024].contiguous(), packed, absmax, 64, "nf4", (48, 1024))
        got = ops.linear_4bit(_misaligned(x[:, :1024], offset), _misaligned(packed, offset), absmax.cuda(), 64, "nf4",
                              (48, 1024))  # fmt: skip
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("M", INT8_ROWS)
@pytest.mark.parametrize("K", [1, 17, 1024, 1025])
@pytest.mark.parametrize("N", [33, 64])
def test_int8_linear_on_cuda_matches_cpu(threshold, M, K, N):
    CB, SCB, bias = _int8_weight(N, K)
    x = _activations(M, K, torch.bfloat16, outlier_columns=[3] if K > 3 else [])
    _assert_int8_linear_matches_cpu(x, CB, SCB, threshold, bias, f"M={M} K={K} N={N} threshold={threshold}")


@pytest.mark.parametrize("M", [1, 65])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_on_cuda_matches_cpu_in_every_dtype(M, dtype):
    CB, SCB, bias = _int8_weight(256, 1024)
    x = _activations(M, 1024, dtype, outlier_columns=[3, 700])
    _assert_int8_linear_matches_cpu(x, CB, SCB, 6.0, bias, f"M={M} {dtype}")


@pytest.mark.parametrize("M", [1, 65])
@pytest.mark.parametrize("n_outliers", [33, 300, 1024])
def test_int8_linear_on_cuda_with_many_outlier_columns(M, n_outliers):
    # More outlier columns than a warp's lanes (GEMV) and than one shared-memory chunk (epilogue), up to every
    # column: the device list holds K entries, so no count overflows it.
    CB, SCB, bias = _int8_weight(64, 1024)
    columns = torch.randperm(1024, generator=torch.Generator().manual_seed(n_outliers))[:n_outliers].tolist()
    x = _activations(M, 1024, torch.float32, outlier_columns=columns)
    _assert_int8_linear_matches_cpu(x, CB, SCB, 6.0, bias, f"M={M} outliers={n_outliers}")


@pytest.mark.parametrize("M", [3, 20])
def test_int8_linear_on_cuda_propagates_nan_like_the_cpu(M):
    CB, SCB, bias = _int8_weight(64, 256)
    x = _activations(M, 256)
    x[1, 5], x[2, 9] = float("nan"), float("inf")
    for threshold in (0.0, 6.0):
        cpu = ops.int8_linear(x, CB, SCB, threshold, bias)
        gpu = ops.int8_linear(x.cuda(), CB.cuda(), SCB.cuda(), threshold, bias.cuda()).cpu()
        assert torch.equal(cpu.isnan(), gpu.isnan()) and torch.equal(cpu.isinf(), gpu.isinf())
        rest = torch.ones(M, dtype=torch.bool)
        rest[[1, 2]] = False
        torch.testing.assert_close(gpu[rest], cpu[rest], rtol=1e-5, atol=1e-4)


def test_int8_ops_on_a_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    CB, SCB, bias = _int8_weight(64, 256)
    x = _activations(20, 256, outlier_columns=[3])
    expected = ops.int8_linear(x, CB, SCB, 6.0, bias)
    with torch.cuda.device(0):
        on_1 = [t.to("cuda:1") for t in (x, CB, SCB, bias)]
        for rows in (1, 20):
            out = ops.int8_linear(on_1[0][:rows], *on_1[1:3], 6.0, on_1[3])
            assert out.device == torch.device("cuda:1")
            torch.testing.assert_close(out.cpu(), expected[:rows], rtol=1e-5, atol=1e-4)
        assert torch.equal(ops.int8_mm(on_1[1], on_1[1]).cpu(), ops.int8_mm(CB, CB))


def _int8_layer(threshold=6.0):
    linear = torch.nn.Linear(1024, 512, device="cuda", dtype=torch.bfloat16)
    return lowbit.Linear8bit.from_linear(linear, threshold=threshold)


@pytest.mark.parametrize("M", [1, 64])  # the GEMV and the cuBLASLt + epilogue path
def test_int8_linear_is_captured_by_a_cuda_graph(M):
    layer = _int8_layer()
    static_x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(static_x)  # warm up outside the capture (cuBLASLt handle, heuristics)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    # Replays see inputs whose outlier columns were unknown at capture: none, then some, then others.
    for columns in ([], [3, 900], list(range(0, 1024, 7))):
        fresh = _activations(M, 1024, torch.bfloat16, outlier_columns=columns, seed=len(columns)).cuda()
        static_x.copy_(fresh)
        graph.replay()
        assert torch.equal(static_out, layer(fresh)), columns


@pytest.mark.parametrize("M", [1, 64])
def test_int8_linear_compiles_fullgraph_on_cuda(M):
    layer = _int8_layer()
    compiled = torch.compile(layer, fullgraph=True)
    for columns in ([], [3, 900]):
        x = _activations(M, 1024, torch.bfloat16, outlier_columns=columns).cuda()
        torch.testing.assert_close(compiled(x), layer(x))
