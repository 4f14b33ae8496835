"""Checkpoints written by transformers + bitsandbytes load into lowbit layers and compute what bitsandbytes does.

The checkpoints are made here with real bitsandbytes on CPU (its CPU backend quantizes through transformers
as on a GPU); the tests are skipped only where bitsandbytes is not installed.
"""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lowbit import Linear4bit, Linear8bit, LowbitConfig
from lowbit.integrations.transformers import bnb_checkpoint_config

bnb = pytest.importorskip("bitsandbytes")

BNB_SCHEMES = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
}
CASES = [("aligned", s) for s in BNB_SCHEMES] + [("odd", "nf4-dq"), ("odd", "int8")]
# bitsandbytes' CPU 4-bit forward asserts out_features % 32 == 0, so it cannot run the odd shape in 4 bits.
OUTPUT_CASES = [case for case in CASES if case[0] == "aligned" or case[1] == "int8"]


@pytest.fixture(scope="module")
def bnb_checkpoint(tiny_llama_factory, tmp_path_factory):
    """`make(shape, scheme) -> path`: the tiny Llama quantized by transformers + bitsandbytes and saved."""
    made = {}

    def make(shape, scheme):
        if (shape, scheme) not in made:
            config = transformers.BitsAndBytesConfig(**BNB_SCHEMES[scheme])
            model = AutoModelForCausalLM.from_pretrained(tiny_llama_factory(shape), quantization_config=config)
            path = tmp_path_factory.mktemp(f"bnb-{shape}-{scheme}")
            model.save_pretrained(path)
            made[shape, scheme] = path
        return made[shape, scheme]

    return make


def load_with_lowbit(path, **kwargs):
    config = bnb_checkpoint_config(path)
    return AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation="eager", **kwargs)


def quantized_layers(model, types):
    return {name: m for name, m in model.named_modules() if isinstance(m, types)}


def prompt():
    return torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape, scheme", CASES)
def test_bnb_checkpoint_loads_bit_identical(bnb_checkpoint, shape, scheme):
    path = bnb_checkpoint(shape, scheme)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    model, info = load_with_lowbit(path, output_loading_info=True)
    assert not any(info.values()), info

    expected_type = Linear8bit if scheme == "int8" else Linear4bit
    layers = quantized_layers(model, (Linear4bit, Linear8bit))
    assert layers and all(type(layer) is expected_type for layer in layers.values())
    for layer in layers.values():
        if expected_type is Linear4bit:
            assert layer.quant_type == BNB_SCHEMES[scheme]["bnb_4bit_quant_type"]
            assert layer.double_quant == BNB_SCHEMES[scheme].get("bnb_4bit_use_double_quant", False)

    # lowbit holds exactly the checkpoint's tensors, and writes them back under the same names.
    checkpoint, state = load_file(path / "model.safetensors"), model.state_dict()
    assert state.keys() == checkpoint.keys()
    for key, tensor in checkpoint.items():
        if ".quant_state." in key:  # JSON: same content, whatever the formatting
            assert json.loads(bytes(state[key].tolist())) == json.loads(bytes(tensor.tolist())), key
        else:
            assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


@pytest.mark.parametrize("shape, scheme", OUTPUT_CASES)
def test_bnb_checkpoint_outputs_match_bitsandbytes(bnb_checkpoint, logit_error_bound, shape, scheme):
    path = bnb_checkpoint(shape, scheme)
    ours = load_with_lowbit(path)
    theirs = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")  # bitsandbytes itself
    # Both hold the same quantized weights; they differ only in how each computes with them (bitsandbytes'
    # CPU path rounds activations to 16 bits, for one). Measure each against the exact computation with those
    # weights, a model holding the dequantized weights in full precision, and bound each deviation as in
    # conftest's `logit_error_bound`: the two logits are then within the sum of the two bounds.
    exact = load_with_lowbit(path).dequantize()
    ids = prompt()
    our_bound, exact_logits = logit_error_bound(exact, ids, quantized_layers(ours, (Linear4bit, Linear8bit)))
    their_bound, _ = logit_error_bound(exact, ids, quantized_layers(theirs, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)))
    with torch.no_grad():
        difference = (ours(ids).logits - theirs(ids).logits).norm()
    assert difference <= our_bound + their_bound, (difference, our_bound, their_bound)
    # Each model's logits are within its bound of the exact ones, so where the exact top two logits are
    # further apart than twice the larger bound, both decode the same next token.
    top2 = exact_logits[0, -1].topk(2).values
    if top2[0] - top2[1] > 2 * max(our_bound, their_bound):
        generate = dict(max_new_tokens=1, do_sample=False)
        assert torch.equal(ours.generate(ids, **generate), theirs.generate(ids, **generate))


def test_bnb_checkpoint_resaves_as_lowbit(bnb_checkpoint, tmp_path):
    model = load_with_lowbit(bnb_checkpoint("aligned", "nf4-dq"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "lowbit" and saved["bits"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert isinstance(reloaded.config.quantization_config, LowbitConfig)
    with torch.no_grad():
        assert torch.equal(reloaded(prompt()).logits, model(prompt()).logits)


def test_bnb_checkpoint_loads_without_bitsandbytes(bnb_checkpoint):
    path = bnb_checkpoint("aligned", "nf4")
    code = f"""
import sys
sys.modules["bitsandbytes"] = None  # any import of bitsandbytes now fails
from transformers import AutoModelForCausalLM
import lowbit
from lowbit.integrations.transformers import bnb_checkpoint_config
model = AutoModelForCausalLM.from_pretrained({str(path)!r}, config=bnb_checkpoint_config({str(path)!r}))
assert isinstance(model.model.layers[0].mlp.down_proj, lowbit.Linear4bit)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_bnb_checkpoint_config_rejects_other_checkpoints(tiny_llama_dir):
    with pytest.raises(ValueError, match="not a bitsandbytes checkpoint"):
        bnb_checkpoint_config(tiny_llama_dir)
