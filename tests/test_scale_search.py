"""The 4-bit scale search end to end: layer option, calibration, config, quantize_model, transformers load and
save, the bitsandbytes export, and the report. (The op itself: tests/test_ops.py and tests/test_fuzz.py.)"""

import json

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from lowbit import Linear4bit, Linear8bit, LowbitConfig, ops, quantize_model
from lowbit.calibrate import input_second_moments
from lowbit.compare import compare
from lowbit.compare.presets import DEFAULT_CONFIGS, PRESETS, describe, preset

AW = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", scale_search="activation")


def _calibration_ids(n=48):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(7))


def _linears(model):
    return {name: m for name, m in model.named_modules() if type(m) is nn.Linear and name != "lm_head"}


# -- layer ----------------------------------------------------------------------------------------


def test_a_searched_layer_loads_into_a_plain_layer_and_computes_the_same():
    # Same format: reading it back needs no search code, only the bytes.
    linear = nn.Linear(130, 24)
    importance = torch.rand(130)
    searched = Linear4bit.from_linear(linear, importance, scale_search=True)
    packed, absmax = ops.quantize_4bit_search(linear.weight, 64, "nf4", importance=importance)
    assert torch.equal(searched.weight.view(-1), packed.view(-1)) and torch.equal(searched.absmax, absmax)
    plain = Linear4bit(130, 24)
    plain.load_state_dict(searched.state_dict())
    x = torch.randn(5, 130)
    assert torch.equal(plain(x), searched(x))
    assert "scale_search=True" in repr(searched) and "scale_search" not in repr(plain)


def test_the_search_without_importance_is_the_data_free_search():
    linear = nn.Linear(64, 8)
    layer = Linear4bit.from_linear(linear, scale_search=True)
    assert torch.equal(layer.absmax, ops.quantize_4bit_search(linear.weight, 64, "nf4")[1])


def test_importance_needs_a_layer_that_searches():
    with pytest.raises(ValueError, match="build the layer with scale_search=True"):
        Linear4bit.from_linear(nn.Linear(64, 8), torch.ones(64))
    with pytest.raises(ValueError, match="Linear8bit has no scale search"):
        Linear8bit.from_linear(nn.Linear(64, 8), torch.ones(64))


# -- calibration ----------------------------------------------------------------------------------


def test_input_second_moments_are_the_mean_square_of_every_input_row():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(4, 6), torch.randn(2, 7, 6)]  # rows from every batch count alike
    moments = input_second_moments(model, {"0": model[0], "2": model[2]}, batches)
    first = torch.cat([b.reshape(-1, 6) for b in batches])
    assert torch.allclose(moments["0"], (first**2).mean(0))
    with torch.no_grad():
        hidden = model[1](model[0](first))
    assert torch.allclose(moments["2"], (hidden**2).mean(0))
    assert not any(m._forward_hooks for m in model)  # the hooks are gone


def test_calibration_batches_may_be_token_ids_or_keyword_dicts(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    linears = _linears(model)
    ids = _calibration_ids()
    from_ids = input_second_moments(model, linears, ids)
    from_dicts = input_second_moments(model, linears, [{"input_ids": ids[None]}])
    assert from_ids.keys() == linears.keys()
    assert all(torch.equal(from_ids[k], from_dicts[k]) for k in linears)


def test_calibration_that_misses_a_layer_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    unused = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="never reached 1 layer.*'unused'"):
        input_second_moments(model, {"0": model[0], "unused": unused}, torch.randn(2, 4))
    with pytest.raises(TypeError, match="calibration must be a tensor of token ids or an iterable"):
        input_second_moments(model, {"0": model[0]}, "some text")


# -- config and quantize_model --------------------------------------------------------------------


def test_config_field_round_trips_and_is_validated():
    config = LowbitConfig(**AW)
    assert config.to_dict()["scale_search"] == "activation" and config.to_dict()["lowbit_config_version"] == LowbitConfig.VERSION
    assert LowbitConfig(**{k: v for k, v in config.to_dict().items() if k != "quant_method"}) == config
    with pytest.raises(ValueError, match=r"scale_search must be one of \[None, 'mse', 'activation'\], got 'awq'"):
        LowbitConfig(load_in_4bit=True, scale_search="awq")


def test_report_presets_name_the_search():
    for name in ("nf4-mse", "nf4-aw", "nf4-aw-dq", "fp4-aw"):
        assert describe(preset(name)) == name
    assert "nf4-aw" in DEFAULT_CONFIGS and "activation-weighted" in PRESETS["nf4-aw"][0]


def test_activation_search_needs_calibration_data(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(ValueError, match='scale_search="activation" weighs .* pass calibration='):
        quantize_model(model, LowbitConfig(**AW))
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_quantize_model_weighs_each_layer_by_its_own_activations(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = _calibration_ids()
    importance = input_second_moments(model, _linears(model), ids)
    weights = {name: m.weight.detach().clone() for name, m in _linears(model).items()}
    quantize_model(model, LowbitConfig(**AW), calibration=ids)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert layers.keys() == weights.keys()
    for name, layer in layers.items():
        expected = ops.quantize_4bit_search(weights[name], 64, "nf4", importance=importance[name])
        assert torch.equal(layer.absmax, expected[1]), name
    data_free = ops.quantize_4bit_search(weights["model.layers.0.mlp.down_proj"], 64, "nf4")[1]
    assert not torch.equal(layers["model.layers.0.mlp.down_proj"].absmax, data_free)


def test_int8_overrides_next_to_a_calibrated_search_get_no_importance(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = LowbitConfig(**AW, module_overrides={"mlp": "int8"})
    quantize_model(model, config, calibration=_calibration_ids())
    kinds = {type(m) for name, m in model.named_modules() if "layers.0." in name and hasattr(m, "bits")}
    assert kinds == {Linear4bit, Linear8bit}


# -- transformers and bitsandbytes ------------------------------------------------------------------


def test_from_pretrained_refuses_the_calibrated_search_and_runs_the_data_free_one(tiny_llama_dir):
    with pytest.raises(ValueError, match="needs the full-precision model run on calibration data"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=LowbitConfig(**AW))
    config = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", scale_search="mse")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layer = model.get_submodule("model.layers.1.self_attn.o_proj")
    assert layer.scale_search
    weight = full.get_submodule("model.layers.1.self_attn.o_proj").weight
    assert torch.equal(layer.absmax, ops.quantize_4bit_search(weight, 64, "nf4")[1])


@pytest.fixture(scope="module")
def calibrated(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager")
    config = LowbitConfig(**AW)
    quantize_model(model, config, calibration=_calibration_ids())
    model.config.quantization_config = config
    return model


def test_a_calibrated_checkpoint_reloads_with_lowbit(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["scale_search"] == "activation"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")  # pre-quantized: no search
    ids = _calibration_ids(16)[None]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, calibrated(ids).logits)


def test_a_calibrated_model_exports_to_bitsandbytes_bit_for_bit(calibrated, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from lowbit.integrations.export import export_bitsandbytes

    export_bitsandbytes(calibrated, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert theirs.config.quantization_config.quant_method == "bitsandbytes"
    layer = theirs.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer, bnb.nn.Linear4bit)
    exported = load_file(tmp_path / "model.safetensors")
    ours = calibrated.state_dict()
    for key in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight.absmax"):
        assert torch.equal(exported[key], ours[key]) and torch.equal(theirs.state_dict()[key], ours[key])


# -- the report -----------------------------------------------------------------------------------


def test_the_report_says_what_the_search_was_calibrated_on(tiny_llama_dir):
    report = compare(tiny_llama_dir, "nf4,nf4-aw", text="The quick brown fox jumps over the lazy dog. " * 8,
                     max_tokens=96, context=64, stride=32, prompts=[], sensitivity=False, timing=False,
                     progress=False)  # fmt: skip
    assert report.calibration.endswith("tokens of the docstrings of CPython's standard-library modules")
    assert "scale search calibrated on" in report.setup
    assert report["nf4-aw"].config["scale_search"] == "activation"
    assert report["nf4-aw"].linear_bytes == report["nf4"].linear_bytes  # same size
    plain = compare(tiny_llama_dir, "nf4", text="Some text. " * 30, max_tokens=64, context=32, stride=16, prompts=[],
                    sensitivity=False, timing=False, progress=False)  # fmt: skip
    assert plain.calibration is None and "calibrated" not in plain.setup
