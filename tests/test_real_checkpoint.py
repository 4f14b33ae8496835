"""A real pretrained Llama (SmolLM2-135M-Instruct, 30 layers) through from_pretrained: quantizing
while loading must give exactly what quantize_model gives on the loaded full-precision model, and
a saved quantized checkpoint must reload bit for bit with identical generations."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lowbit

pytestmark = pytest.mark.slow

CONFIGS = {
    "int8": lowbit.LowbitConfig(load_in_8bit=True),
    "nf4-dq": lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
}


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory, smollm2_gguf):
    folder, name = smollm2_gguf
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain float32 checkpoint.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_pretrained_equals_quantize_model_and_reloads(smollm2_dir, tmp_path, name):
    config = CONFIGS[name]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    inputs = tokenizer("Explain the accuracy tradeoff in quantization.", return_tensors="pt")

    loaded = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=config, dtype=torch.float32)
    swapped = lowbit.quantize_model(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), config)
    n_quantized = sum(isinstance(m, (lowbit.Linear4bit, lowbit.Linear8bit)) for m in loaded.modules())
    assert n_quantized == 30 * 7  # every projection of every layer; lm_head (tied) stays full precision
    with torch.no_grad():
        logits = loaded(**inputs).logits
        assert torch.equal(logits, swapped(**inputs).logits)

    loaded.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for (key, a), (key_b, b) in zip(loaded.state_dict().items(), again.state_dict().items()):
        assert key == key_b and a.dtype == b.dtype and torch.equal(a, b), key
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, logits)
        greedy = dict(max_new_tokens=12, do_sample=False)
        assert torch.equal(loaded.generate(**inputs, **greedy), again.generate(**inputs, **greedy))
