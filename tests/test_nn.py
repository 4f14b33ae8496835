"""Linear4bit / Linear8bit: outputs, state_dict round trips, device/dtype moves, torch.compile, bad checkpoints.
Tests that run kernels take `device` (conftest.py): on a GPU machine they run on CUDA too."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import DTYPES, QUANT_TYPES, assert_close_to_exact

from lowbit import Linear4bit, Linear8bit, reference


def _linear(k, n, dtype=torch.float32, bias=True):
    torch.manual_seed(k * 31 + n)
    return nn.Linear(k, n, bias=bias).to(dtype)


def _four_bit(linear, **options):
    return Linear4bit.from_linear(linear, **options)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(64, 17), (1025, 33)])
def test_linear4bit_matches_dequantized_reference(device, quant_type, double_quant, dtype, k, n):
    with torch.device(device):
        lin = _linear(k, n, dtype)
        layer = _four_bit(lin, quant_type=quant_type, double_quant=double_quant)
        x = torch.randn(3, 5, k).to(dtype)
        out = layer(x)
        W = layer.dequantize()
        assert W.dtype == dtype and W.shape == (n, k)
        ref = F.linear(x, W, lin.bias)
        exact = x.double() @ layer.dequantize().double().t() + lin.bias.double()
        # dequantize() rounds W to `dtype`; the layer uses the float32 scales: compare to both.
        exact_fp32_w = x.double() @ _dequant_fp32(layer).t() + lin.bias.double()
        assert out.shape == (3, 5, n) and out.dtype == dtype
        err = min((out.double() - exact).abs().max(), (out.double() - exact_fp32_w).abs().max())
        ref_err = (ref.double() - exact).abs().max()
        assert err <= 2 * ref_err + torch.finfo(dtype).eps * exact.abs().max()


def _dequant_fp32(layer):
    state = layer.quant_state()
    return reference.dequantize_4bit(layer.weight, state.float_absmax(), layer.blocksize, layer.quant_type,
                                     state.shape, torch.float64)  # fmt: skip


def test_quantization_error_is_bounded_by_half_a_code_step(device):
    with torch.device(device):
        lin = _linear(256, 64)
        for quant_type in QUANT_TYPES:
            layer = _four_bit(lin, quant_type=quant_type)
            code = torch.sort(reference.code_4bit(quant_type)).values
            widest = code.diff().max()
            scales = layer.absmax.repeat_interleave(64).view(64, 256)
            assert ((layer.dequantize() - lin.weight).abs() <= widest / 2 * scales + 1e-7).all()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear8bit_matches_reference(device, threshold, dtype):
    with torch.device(device):
        lin = _linear(1025, 17, dtype)
        layer = Linear8bit.from_linear(lin, threshold=threshold)
        assert layer.weight.dtype == torch.int8 and layer.SCB.dtype == torch.float32
        x = torch.randn(4, 1025).to(dtype)
        x[:, 7] = 12.0  # an outlier column
        out = layer(x)
        ref = reference.int8_linear(x, layer.weight, layer.SCB, threshold, lin.bias)
        q, stats, cols = reference.int8_vectorwise_quant(x, threshold)
        w = layer.weight.double() * layer.SCB.double().unsqueeze(1) / 127
        exact = (q.double() @ w.t()) * stats.double().unsqueeze(1) / 127 + x[:, cols].double() @ w[:, cols].t()
        assert_close_to_exact(out, ref, exact + lin.bias.double(), "Linear8bit")


def test_int8_outlier_decomposition_helps(device):
    with torch.device(device):
        # With a large-magnitude column, keeping it in float beats squeezing it into int8.
        lin = _linear(512, 64)
        x = torch.randn(8, 512)
        x[:, 11] = 40.0
        truth = lin(x)
        errs = {t: (Linear8bit.from_linear(lin, threshold=t)(x) - truth).norm() for t in (0.0, 6.0)}
        assert errs[6.0] < errs[0.0] / 2


@pytest.mark.parametrize("make", [
    lambda lin: _four_bit(lin, quant_type="nf4"),
    lambda lin: _four_bit(lin, quant_type="fp4", double_quant=True, blocksize=128),
    lambda lin: _four_bit(lin, quant_type="nf4", quant_storage=torch.bfloat16),
    lambda lin: Linear8bit.from_linear(lin),
])  # fmt: skip
def test_state_dict_round_trip_is_bit_identical(device, make):
    with torch.device(device):
        lin = _linear(128, 24)
        layer = make(lin)
        sd = layer.state_dict()
        assert "weight" in sd and "bias" in sd
        fresh = type(layer)(128, 24, device="meta")  # defaults differ from the saved layer's options
        fresh.load_state_dict(sd)
        sd2 = fresh.state_dict()
        assert sd.keys() == sd2.keys()
        for key in sd:
            assert sd[key].dtype == sd2[key].dtype and torch.equal(_bits(sd[key]), _bits(sd2[key])), key
        x = torch.randn(3, 128)
        assert torch.equal(layer(x), fresh(x))


def _bits(t):
    return t.flatten().view(torch.uint8)  # packed bytes in a float storage dtype may spell NaN


def test_4bit_state_dict_keys_are_bitsandbytes_keys():
    sd = _four_bit(_linear(64, 8), quant_type="fp4", double_quant=True).state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__fp4"}  # fmt: skip
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__fp4"].tolist()))
    assert meta["quant_type"] == "fp4" and meta["shape"] == [8, 64] and meta["blocksize"] == 64
    assert sd["weight"].shape == (256, 1) and sd["weight.absmax"].dtype == torch.uint8
    sd8 = Linear8bit.from_linear(_linear(64, 8)).state_dict()
    assert set(sd8) == {"weight", "SCB", "weight_format", "bias"} and sd8["weight_format"].item() == 0


def test_to_dtype_never_casts_the_quantized_state(device):
    with torch.device(device):
        layer = _four_bit(_linear(64, 16), quant_storage=torch.bfloat16, double_quant=True)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.half()
        after = layer.state_dict()
        for key in before:
            if key == "bias":
                assert after[key].dtype == torch.float16
            else:
                assert after[key].dtype == before[key].dtype and torch.equal(_bits(after[key]), _bits(before[key])), key
        assert layer(torch.randn(2, 64, dtype=torch.float16)).dtype == torch.float16
        l8 = Linear8bit.from_linear(_linear(64, 16)).to(torch.bfloat16)
        assert l8.SCB.dtype == torch.float32 and l8.weight.dtype == torch.int8


def test_to_device_moves_without_dequantizing():
    layer = _four_bit(_linear(64, 16))
    moved = layer.to("meta")
    assert moved.weight.device.type == "meta" and moved.weight.dtype == torch.uint8
    assert moved.weight.shape == (512, 1) and moved.absmax.dtype == torch.float32


def test_compute_dtype(device):
    with torch.device(device):
        lin = _linear(64, 16)
        layer = _four_bit(lin, compute_dtype=torch.bfloat16)
        x = torch.randn(2, 64)
        out = layer(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, F.linear(x.bfloat16(), layer.dequantize().bfloat16(), lin.bias.bfloat16()).float(),
                                   rtol=2e-2, atol=2e-2)  # fmt: skip


def test_repr_is_readable():
    text = repr(_four_bit(_linear(64, 16), quant_type="fp4", double_quant=True))
    assert "Linear4bit(in_features=64, out_features=16, bias=True, quant_type=fp4, blocksize=64, double_quant=True" in text
    assert "KiB" in text
    assert "threshold=6.0" in repr(Linear8bit.from_linear(_linear(64, 16)))


def test_weights_are_buffers_and_bias_a_parameter():
    layer = _four_bit(_linear(64, 16))
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert not layer.weight.is_floating_point()


@pytest.mark.parametrize("make", [lambda lin: _four_bit(lin, double_quant=True), Linear8bit.from_linear])
def test_torch_compile_fullgraph(device, make):
    with torch.device(device):
        layer = make(_linear(128, 32))
        x = torch.randn(4, 128)
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x))


def test_backward_reaches_input_and_bias_only(device):
    with torch.device(device):
        layer = _four_bit(_linear(64, 16))
        x = torch.randn(3, 64, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and layer.bias.grad is not None


# -- bad input -------------------------------------------------------------------------------------


def test_constructor_rejects_bad_options():
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        Linear4bit(64, 16, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(64, 16, quant_type="int4")
    with pytest.raises(ValueError, match="multiple of 4"):
        Linear4bit(3, 3, quant_storage=torch.float32)
    with pytest.raises(ValueError, match="threshold"):
        Linear8bit(64, 16, threshold=-1)


def test_quantize_rejects_bad_weights():
    layer = Linear4bit(64, 16)
    with pytest.raises(ValueError, match="shape"):
        layer.quantize_weight_(torch.randn(16, 65))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer.quantize_weight_(torch.zeros(16, 64, dtype=torch.int32))
    bad = torch.randn(16, 64)
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.quantize_weight_(bad)
    with pytest.raises(ValueError, match="NaN/Inf"):
        Linear8bit(64, 16).quantize_weight_(bad)
    with pytest.raises(ValueError, match="float16 range"):
        Linear8bit(64, 16).quantize_weight_(torch.full((16, 64), 1e6))


@pytest.fixture
def sd4():
    return _four_bit(_linear(64, 16), double_quant=True).state_dict()


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd.pop("weight.absmax"), "lacks 'weight.absmax'"),
    (lambda sd: sd.pop("weight.nested_absmax"), "lacks 'weight.nested_absmax'"),
    (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "quant_state"),
    (lambda sd: sd.__setitem__("weight", sd["weight"][:100]), "truncated or mismatched"),
    (lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"][:5]), "absmax' has 5 entries"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4",
                               sd["weight.quant_state.bitsandbytes__nf4"][:-7]), "not valid JSON"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _meta(sd, shape=[32, 32])), "has shape \\[32, 32\\], but this layer is \\[16, 64\\]"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", _meta(sd, blocksize=48)), "blocksize"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__fp4", sd.pop("weight.quant_state.bitsandbytes__nf4")),
     "says 'fp4' but its contents say 'nf4'"),
])  # fmt: skip
def test_corrupt_4bit_checkpoint_raises_clear_error(sd4, corrupt, match):
    corrupt(sd4)
    with pytest.raises(ValueError, match=match):
        Linear4bit(64, 16).load_state_dict(sd4)


def _meta(sd, **changes):
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    meta.update(changes)
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def test_corrupt_8bit_checkpoint_raises_clear_error():
    sd = Linear8bit.from_linear(_linear(64, 16)).state_dict()
    for key, value, match in [
        ("SCB", torch.ones(15), "SCB' must be float32 \\[16\\]"),
        ("SCB", torch.full((16,), float("nan")), "NaN, Inf or negative row scales"),
        ("weight", torch.zeros(16, 64), "must be int8"),
        ("weight_format", torch.tensor(1, dtype=torch.uint8), "weight_format 1 is not supported"),
    ]:
        bad = dict(sd, **{key: value})
        with pytest.raises(ValueError, match=match):
            Linear8bit(64, 16).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="Missing key"):
        Linear8bit(64, 16).load_state_dict({k: v for k, v in sd.items() if k != "bias"})


def test_input_width_is_checked():
    layer = _four_bit(_linear(3, 1))  # 3 weights pack into 2 bytes: a width of 4 would also fit
    with pytest.raises(ValueError, match="input has 4 features, Linear4bit expects 3"):
        layer(torch.randn(2, 4))


def test_custom_quant_map_is_refused(sd4):
    sd4["weight.quant_map"] = torch.linspace(-1, 1, 16)
    with pytest.raises(ValueError, match="not the standard nf4 table"):
        Linear4bit(64, 16).load_state_dict(sd4)


def test_bias_is_checked_and_loaded_in_place(sd4):
    layer = _four_bit(_linear(64, 16), double_quant=True)
    bias = layer.bias
    layer.load_state_dict(sd4)
    assert layer.bias is bias and torch.equal(layer.bias, sd4["bias"])
    sd4["bias"] = torch.randn(17)
    with pytest.raises(ValueError, match="bias has shape \\[17\\], expected \\[16\\]"):
        layer.load_state_dict(sd4)


def test_double_quant_of_empty_weight():
    layer = Linear4bit.from_linear(nn.Linear(0, 4), double_quant=True)
    assert layer.nested_offset == 0.0 and layer(torch.randn(2, 0)).shape == (2, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_only_int8_keeps_activations_in_float(device, dtype):
    with torch.device(device):
        lin = _linear(1025, 17, dtype)
        layer = Linear8bit.from_linear(lin, weight_only=True)
        assert "weight_only=True" in repr(layer)
        x = torch.randn(4, 1025).to(dtype)
        x[:, 7] = 12.0  # no outlier decomposition needed: nothing rounds x
        out = layer(x)
        ref = reference.int8_weight_linear(x, layer.weight, layer.SCB, lin.bias)
        W = layer.weight.double() * layer.SCB.double().unsqueeze(1) / 127
        assert_close_to_exact(out, ref, x.double() @ W.t() + lin.bias.double(), "Linear8bit(weight_only)")
        # The same weights and checkpoint as LLM.int8(), and closer to full precision.
        llm_int8 = Linear8bit.from_linear(lin)
        assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), llm_int8.state_dict().values()))
        truth = lin(x).double()
        assert (out.double() - truth).norm() < (llm_int8(x).double() - truth).norm()
