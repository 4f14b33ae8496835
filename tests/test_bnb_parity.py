"""Formats against bitsandbytes (its CPU backend is the oracle): bytes must match so checkpoints
interoperate, and layer outputs must agree within what the two algorithms' differences allow."""

import json
import math

import pytest
import torch
from helpers import DTYPES, QUANT_TYPES

from lowbit import Linear4bit, Linear8bit, ops
from lowbit.formats import dynamic_map, nested_offset

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the format oracle; install lowbit[test]")
F = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 1025), (256, 512)])
def test_4bit_bytes_match_bitsandbytes(quant_type, blocksize, dtype, shape):
    W = torch.randn(shape).to(dtype)
    packed, state = F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    ours, absmax = ops.quantize_4bit(W, blocksize, quant_type)
    assert torch.equal(ours, packed)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(ops.dequantize_4bit(ours, absmax, blocksize, quant_type, shape, dtype),
                       F.dequantize_4bit(packed, state))  # fmt: skip


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(dynamic_map(), F.create_dynamic_map(signed=True))


def _offsets_agree(ours: float, theirs: float, absmax: torch.Tensor) -> bool:
    """lowbit's nested offset is the exact mean of the block scales rounded to float32 (formats.nested_offset);
    bitsandbytes' is ATen's float32 mean, whose summation order (so its last bits) follows the device and the
    thread count: within that summation's error bound, log2(n) roundings of the running sum, of the exact mean."""
    exact = math.fsum(absmax.double().tolist()) / absmax.numel()
    assert ours == torch.tensor(exact, dtype=torch.float32).item()
    return abs(theirs - exact) <= (math.log2(absmax.numel()) + 1) * 2**-24 * abs(exact) + 2**-149


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_state_matches_bitsandbytes(quant_type, dtype):
    W = torch.randn(512, 1024).to(dtype)
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=True)
    lin = torch.nn.Linear(1024, 512, bias=False, dtype=dtype)
    lin.weight.data = W
    layer = Linear4bit.from_linear(lin, quant_type=quant_type, double_quant=True)
    theirs = {"weight." + k: v for k, v in state.as_dict(packed=True).items()} | {"weight": packed}
    ours = layer.state_dict()
    assert ours.keys() == theirs.keys()
    json_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    for key in ours.keys() - {"weight.absmax", "weight.nested_absmax", json_key}:
        assert torch.equal(ours[key], theirs[key]), key
    ours_json, theirs_json = (json.loads(bytes(d[json_key].tolist())) for d in (ours, theirs))
    _, absmax = ops.quantize_4bit(W, 64, quant_type)
    assert _offsets_agree(ours_json.pop("nested_offset"), theirs_json.pop("nested_offset"), absmax)
    assert ours_json == theirs_json
    # At lowbit's offset, bitsandbytes' blockwise quantizer gives the same nested scales and, up to its search's
    # resolution (below), the same codes.
    codes, nested = F.quantize_blockwise(absmax - layer.nested_offset, code=dynamic_map(), blocksize=256)
    assert torch.equal(ours["weight.nested_absmax"], nested.absmax)
    # The 8-bit codes of the absmax: bitsandbytes' CPU search is not exactly round-to-nearest: it
    # resolves the normalized value only to about 1.5e-5 (measured over 3M values), so where codes lie
    # closer than that to each other or to the value, it may take a code other than the nearest. lowbit
    # rounds to nearest, so codes may differ only where bitsandbytes' pick is within that resolution of the
    # nearest code's distance (0.2% of codes in that measurement). Near zero the dynamic map's codes are a
    # few 1e-6 apart, so such a pick can be two or three codes away (seen: 129 against 131).
    code = dynamic_map()
    x = (absmax - layer.nested_offset) / nested.absmax.repeat_interleave(256)[: absmax.numel()]
    differ = (ours["weight.absmax"] != codes).nonzero().view(-1)
    for i in differ.tolist():
        nearest, picked = code[int(ours["weight.absmax"][i])], code[int(codes[i])]
        assert (x[i] - nearest).abs() <= (x[i] - picked).abs(), "lowbit's code must be the nearest"
        assert (x[i] - picked).abs() <= (x[i] - nearest).abs() + 3e-5, (x[i], nearest, picked)
    assert len(differ) <= 0.01 * len(x)


def test_nested_offset_does_not_depend_on_the_thread_count():
    """Double quantization's offset (and so every byte of the state) is the same whatever the thread count (and
    device: it is summed exactly on the host), which ATen's float32 mean, bitsandbytes' offset, is not."""
    absmax = torch.rand(131072, generator=torch.Generator().manual_seed(0)) * 3
    W = torch.randn(512, 4096, generator=torch.Generator().manual_seed(1))
    lin = torch.nn.Linear(4096, 512, bias=False)
    lin.weight.data = W
    means, offsets, states = set(), set(), []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 8):
            torch.set_num_threads(threads)
            means.add(absmax.mean().item())
            offsets.add(nested_offset(absmax))
            states.append(Linear4bit.from_linear(lin, double_quant=True).state_dict())
    finally:
        torch.set_num_threads(before)
    assert len(means) > 1, "this vector no longer shows ATen's thread-dependent mean (the premise of the test)"
    assert len(offsets) == 1
    assert all(s.keys() == states[0].keys() and all(torch.equal(s[k], states[0][k]) for k in s) for s in states)


def test_int8_weights_match_bitsandbytes():
    W = torch.randn(96, 1025)
    lin = torch.nn.Linear(1025, 96)
    lin.weight.data = W
    CB, SCB, _ = F.int8_vectorwise_quant(W.to(torch.float16))
    layer = Linear8bit.from_linear(lin)
    assert torch.equal(layer.weight, CB) and torch.equal(layer.SCB, SCB)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_activation_codes_match_bitsandbytes(threshold):
    x = torch.randn(17, 1025, dtype=torch.float16)
    x[:, 5] = 30
    q, stats, cols = F.int8_vectorwise_quant(x.clone(), threshold)
    ours = ops.int8_vectorwise_quant(x, threshold)
    assert torch.equal(ours[0], q) and torch.equal(ours[1], stats)
    assert torch.equal(ours[2], cols if cols is not None else torch.empty(0, dtype=torch.int64))


def _bnb_4bit(W, bias, quant_type, double_quant):
    layer = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=bias is not None, quant_type=quant_type,
                              compress_statistics=double_quant)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant)  # fmt: skip
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_4bit_state_dict_loads_and_gives_its_outputs(quant_type, double_quant):
    W, bias = torch.randn(48, 256), torch.randn(48)
    theirs = _bnb_4bit(W, bias, quant_type, double_quant)
    ours = Linear4bit(256, 48, device="meta")
    ours.load_state_dict(theirs.state_dict())
    assert ours.quant_type == quant_type and ours.double_quant == double_quant
    x = torch.randn(5, 256)
    with torch.no_grad():
        expected = theirs(x)
    # Both dequantize the same codes with the same float32 scales; they differ only in summation order.
    exact = x.double() @ ours.dequantize().double().t() + bias.double()
    tol = 4 * torch.finfo(torch.float32).eps * (x.double().abs() @ ours.dequantize().double().abs().t()).max()
    assert (ours(x).double() - exact).abs().max() <= tol
    assert (expected.double() - exact).abs().max() <= tol


def test_bitsandbytes_8bit_state_dict_loads_and_outputs_agree():
    W, bias = torch.randn(48, 256), torch.randn(48)
    theirs = bnb.nn.Linear8bitLt(256, 48, has_fp16_weights=False, threshold=6.0)
    theirs.weight = bnb.nn.Int8Params(W.clone(), requires_grad=False, has_fp16_weights=False)
    theirs.bias = torch.nn.Parameter(bias.clone())
    theirs = theirs.to("cpu")
    ours = Linear8bit(256, 48, device="meta")
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight.data)
    x = torch.randn(5, 256)
    with torch.no_grad():
        expected = theirs(x)
    # bitsandbytes' CPU path multiplies float activations by the dequantized weight; lowbit
    # quantizes the activations too (LLM.int8()). Rounding x to int8 moves each element by at
    # most half a step (row_absmax / 254), so outputs differ by at most that times sum|W_row|.
    w = ours.dequantize().float()
    step = x.abs().amax(dim=1, keepdim=True) / 254
    bound = step * w.abs().sum(dim=1) + 1e-4
    assert ((ours(x) - expected).abs() <= bound).all()


def test_quant_state_json_is_bitsandbytes_json():
    W = torch.randn(16, 64, dtype=torch.bfloat16)
    theirs = _bnb_4bit(W, None, "nf4", True).state_dict()
    lin = torch.nn.Linear(64, 16, bias=False, dtype=torch.bfloat16)
    lin.weight.data = W
    ours = Linear4bit.from_linear(lin, double_quant=True).state_dict()
    key = "weight.quant_state.bitsandbytes__nf4"
    ours_json, theirs_json = json.loads(bytes(ours[key].tolist())), json.loads(bytes(theirs[key].tolist()))
    _, absmax = ops.quantize_4bit(W, 64, "nf4")
    assert _offsets_agree(ours_json.pop("nested_offset"), theirs_json.pop("nested_offset"), absmax)
    assert ours_json == theirs_json
