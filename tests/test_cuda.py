"""On a CUDA machine: lowbit layers and ops on CUDA tensors agree with the CPU kernels. Until
csrc/cuda/ has kernels, CUDA tensors run lowbit.reference; these tests hold that path to the same
bytes and outputs as the native CPU kernels. Skipped where no GPU is present."""

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
