"""export_bitsandbytes: a model quantized with lowbit, saved as a transformers + bitsandbytes checkpoint, loads
with bitsandbytes itself (its CPU backend) holding lowbit's tensors bit for bit and computing what lowbit does;
what one BitsAndBytesConfig cannot describe is refused before anything is written.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lowbit
from lowbit import Linear4bit, Linear8bit, LowbitConfig
from lowbit.integrations.export import BNB_4BIT_BLOCKSIZES, export_bitsandbytes

# The four schemes as transformers' BitsAndBytesConfig arguments (LowbitConfig takes the same), and the
# helpers that load bitsandbytes checkpoints into lowbit, shared with the tests of those checkpoints.
from test_bnb_checkpoints import BNB_SCHEMES, load_with_lowbit, prompt, quantized_layers

bnb = pytest.importorskip("bitsandbytes")

LOWBIT_LAYERS = (Linear4bit, Linear8bit)
BNB_LAYERS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def exported(tiny_llama_factory, tmp_path_factory):
    """`make(scheme) -> (lowbit model, export folder)`: the tiny Llama quantized by lowbit and exported."""
    made = {}

    def make(scheme):
        if scheme not in made:
            config = LowbitConfig(**BNB_SCHEMES[scheme])
            path = tiny_llama_factory(num_hidden_layers=1)
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, attn_implementation="eager")
            out = tmp_path_factory.mktemp(f"export-{scheme}")
            export_bitsandbytes(model, out)
            made[scheme] = model, out
        return made[scheme]

    return make


def load_with_bitsandbytes(path):
    """The export loaded by transformers' bitsandbytes quantizer, checked to hold bitsandbytes' layers."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    assert model.config.quantization_config.quant_method == "bitsandbytes"
    assert quantized_layers(model, BNB_LAYERS), "transformers loaded no bitsandbytes layer"
    return model


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        if ".quant_state." in key:  # JSON: the same content, whatever the formatting
            assert json.loads(bytes(actual[key].tolist())) == json.loads(bytes(tensor.tolist())), key
        else:
            assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("scheme", BNB_SCHEMES)
def test_export_loads_with_bitsandbytes_bit_identical(exported, scheme):
    ours, path = exported(scheme)
    assert isinstance(ours.config.quantization_config, LowbitConfig)  # the model keeps its own config

    # config.json says what transformers + bitsandbytes would write for the same quantization.
    written = json.loads((path / "config.json").read_text())["quantization_config"]
    expected = transformers.BitsAndBytesConfig(**BNB_SCHEMES[scheme], llm_int8_skip_modules=["lm_head"]).to_dict()
    assert written == json.loads(json.dumps(expected))

    exported_tensors = load_file(path / "model.safetensors")
    assert_same_tensors(exported_tensors, ours.state_dict())
    theirs = load_with_bitsandbytes(path)
    lowbit_layers, bnb_layers = quantized_layers(ours, LOWBIT_LAYERS), quantized_layers(theirs, BNB_LAYERS)
    assert bnb_layers.keys() == lowbit_layers.keys()
    expected_type = bnb.nn.Linear8bitLt if scheme == "int8" else bnb.nn.Linear4bit
    assert all(type(layer) is expected_type for layer in bnb_layers.values())
    assert_same_tensors(theirs.state_dict(), exported_tensors)  # bitsandbytes holds exactly these bytes


@pytest.mark.parametrize("scheme", BNB_SCHEMES)
def test_export_computes_what_lowbit_computes(exported, logit_error_bound, scheme):
    ours, path = exported(scheme)
    theirs = load_with_bitsandbytes(path)
    # Both hold the same quantized weights and differ only in how each computes with them (bitsandbytes' CPU
    # path rounds activations and scales to 16 bits). Measure each against the exact computation with those
    # weights, the export loaded back into lowbit and dequantized to full precision, bounded as in conftest's
    # `logit_error_bound`: the two logits are then within the sum of the two bounds.
    exact = load_with_lowbit(path).dequantize()
    ids = prompt()
    our_bound, _ = logit_error_bound(exact, ids, quantized_layers(ours, LOWBIT_LAYERS))
    their_bound, _ = logit_error_bound(exact, ids, quantized_layers(theirs, BNB_LAYERS))
    with torch.no_grad():
        difference = (ours(ids).logits - theirs(ids).logits).norm()
    assert difference <= our_bound + their_bound, (difference, our_bound, their_bound)


def test_export_loads_without_lowbit(exported):
    _, path = exported("nf4-dq")
    code = f"""
import sys
sys.modules["lowbit"] = None  # any import of lowbit now fails
import bitsandbytes
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(path)!r})
assert isinstance(model.model.layers[0].mlp.down_proj, bitsandbytes.nn.Linear4bit)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_full_precision_overrides_become_skip_modules(tiny_llama_factory, tmp_path):
    config = LowbitConfig(**BNB_SCHEMES["nf4"], module_overrides={r"layers\.0\.mlp\.": "none"})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_factory(), quantization_config=config)
    written = export_bitsandbytes(model, tmp_path)
    full_precision = ["lm_head"] + [f"model.layers.0.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    assert written.llm_int8_skip_modules == full_precision
    theirs = load_with_bitsandbytes(tmp_path)
    assert all(type(theirs.get_submodule(name)) is torch.nn.Linear for name in full_precision)
    assert quantized_layers(theirs, BNB_LAYERS).keys() == quantized_layers(model, LOWBIT_LAYERS).keys()


def test_export_of_a_model_quantized_without_transformers(tiny_llama_factory, tmp_path):
    model = lowbit.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_factory()),
                                  LowbitConfig(**BNB_SCHEMES["int8"]))  # fmt: skip
    export_bitsandbytes(model, tmp_path)
    assert not hasattr(model.config, "quantization_config")  # left as it was
    theirs = load_with_bitsandbytes(tmp_path)
    assert quantized_layers(theirs, BNB_LAYERS).keys() == quantized_layers(model, LOWBIT_LAYERS).keys()


def test_export_is_public():
    assert lowbit.export_bitsandbytes is export_bitsandbytes, "lowbit/__init__.py does not export export_bitsandbytes"


def test_blocksizes_are_the_ones_bitsandbytes_accepts():
    weight = torch.randn(64, 64)
    for blocksize in BNB_4BIT_BLOCKSIZES:
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")
        assert bnb.functional.dequantize_4bit(packed, state).shape == weight.shape
    for blocksize in (BNB_4BIT_BLOCKSIZES[0] // 2, BNB_4BIT_BLOCKSIZES[-1] * 2):
        with pytest.raises(ValueError, match="invalid blocksize"):
            bnb.functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")


# -- refusals ------------------------------------------------------------------------------------------------


@pytest.fixture
def full_precision(tiny_llama_factory):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_factory())


def assert_refused(model, tmp_path, match, error=ValueError):
    out_dir = tmp_path / "out"
    with pytest.raises(error, match=match):
        export_bitsandbytes(model, out_dir)
    assert not out_dir.exists(), "a refused export wrote files"


@pytest.mark.parametrize("override", ["int8", "fp4"])
def test_refuses_mixed_schemes(full_precision, tmp_path, override):
    config = LowbitConfig(**BNB_SCHEMES["nf4"], module_overrides={r"down_proj$": override})
    lowbit.quantize_model(full_precision, config)
    assert_refused(full_precision, tmp_path, rf"one quantization scheme .*'nf4' in .*'{override}' in .*down_proj")


@pytest.mark.parametrize(
    "scheme, field, other",
    [
        ("int8", "llm_int8_threshold", dict(llm_int8_threshold=0.0)),
        ("nf4", "bnb_4bit_use_double_quant", dict(bnb_4bit_use_double_quant=True)),
        ("nf4", "bnb_4bit_compute_dtype", dict(bnb_4bit_compute_dtype="bfloat16")),
        ("nf4", "bnb_4bit_quant_storage", dict(bnb_4bit_quant_storage="float32")),
    ],
)
def test_refuses_layers_with_different_options(full_precision, tmp_path, scheme, field, other):
    # One decoder layer quantized with other options first: quantize_model then leaves it alone.
    lowbit.quantize_model(full_precision.model.layers[1], LowbitConfig(**BNB_SCHEMES[scheme], **other))
    lowbit.quantize_model(full_precision, LowbitConfig(**BNB_SCHEMES[scheme]))
    assert_refused(full_precision, tmp_path, rf"one {field} to every layer, but this model has .* in .*layers\.1")


def test_refuses_blocksizes_bitsandbytes_does_not_compute_with(full_precision, tmp_path):
    lowbit.quantize_model(full_precision, LowbitConfig(**BNB_SCHEMES["nf4"]))
    # lowbit's own blocksizes are bitsandbytes' today, so a layer outside them is made by hand.
    too_large = BNB_4BIT_BLOCKSIZES[-1] * 2
    full_precision.model.layers[0].mlp.up_proj.blocksize = too_large
    expected = rf"blocksizes .* only, but this model has blocksize {too_large} in model\.layers\.0\.mlp\.up_proj"
    assert_refused(full_precision, tmp_path, expected)


def test_refuses_weight_only_int8(full_precision, tmp_path):
    lowbit.quantize_model(full_precision, LowbitConfig(load_in_8bit=True, llm_int8_weight_only=True))
    assert_refused(full_precision, tmp_path, r"weight-only int8 .* would run LLM\.int8\(\)")


def test_refuses_a_model_without_lowbit_layers(full_precision, tmp_path):
    assert_refused(full_precision, tmp_path, "has no lowbit layers")


def test_refuses_layers_that_hold_no_weight(full_precision, tmp_path):
    lowbit.replace_linears(full_precision, LowbitConfig(**BNB_SCHEMES["nf4"]))
    assert_refused(full_precision, tmp_path, "hold no weight")


def test_refuses_what_is_not_a_transformers_model(tmp_path):
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 64))
    assert_refused(torch.nn.Sequential(layer), tmp_path, "needs a transformers PreTrainedModel", TypeError)
