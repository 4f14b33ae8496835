"""On a CUDA machine: what the device-parametrized op tests cannot show. Layers moved to CUDA and models
loaded there give the CPU's answers; the CUDA linear_4bit's two paths (fused GEMV, dequantize + cuBLAS)
agree with the CPU kernel; it is captured by CUDA graphs and compiled whole. Ops without a CUDA kernel run
lowbit.reference. Skipped where no GPU is present."""

import pytest
import torch
from helpers import QUANT_TYPES

import lowbit
from lowbit import ops

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_on_cuda_matches_cpu_bytes(quant_type, dtype):
    W = torch.randn(257, 1025).to(dtype)
    cpu = ops.quantize_4bit(W, 64, quant_type)
    gpu = ops.quantize_4bit(W.cuda(), 64, quant_type)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


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
    assert all(t.device.type == "cuda" for t in moved.state_dict().values() if t.dim())
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


@pytest.mark.parametrize("rows", [1, 8, 9, 64])  # the fused GEMV up to 8 rows, dequantize + cuBLAS beyond
def test_linear_4bit_cuda_paths_match_the_cpu_kernel(rows):
    layer = _nf4_layer(4096, 1024, dtype=torch.float32)
    x = torch.randn(rows, 4096)
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
