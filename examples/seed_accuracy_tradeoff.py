"""The accuracy-tradeoff example from the seed document, with lowbit as the quantization backend.

Only two things differ from the original: `BitsAndBytesConfig` comes from lowbit, and the model is
taken from the command line (or $LOWBIT_EXAMPLE_MODEL), by default lowbit's built-in SmolLM2 written
once as a model directory, so it runs offline:

    python examples/seed_accuracy_tradeoff.py                       # the built-in SmolLM2
    python examples/seed_accuracy_tradeoff.py /path/to/llama-checkpoint

The document's "Common variations" 4-bit snippet follows the main script unchanged.
"""

import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowbit import BitsAndBytesConfig
from lowbit.compare import default_model_directory

# Load tokenizer
model_name = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LOWBIT_EXAMPLE_MODEL") or default_model_directory()
tokenizer = AutoTokenizer.from_pretrained(model_name)

# Load full precision model
model_fp32 = AutoModelForCausalLM.from_pretrained(model_name, device_map="auto")
model_fp32.eval()

# Prepare input
input_text = "Explain the accuracy tradeoff in quantization."
inputs = tokenizer(input_text, return_tensors="pt").to(model_fp32.device)

# Generate output with full precision
with torch.no_grad():
    outputs_fp32 = model_fp32.generate(**inputs, max_new_tokens=50)
result_fp32 = tokenizer.decode(outputs_fp32[0], skip_special_tokens=True)

# Load 8-bit quantized model
quant_config = BitsAndBytesConfig(load_in_8bit=True)
model_8bit = AutoModelForCausalLM.from_pretrained(model_name, quantization_config=quant_config, device_map="auto")
model_8bit.eval()

# Generate output with quantized model
inputs = tokenizer(input_text, return_tensors="pt").to(model_8bit.device)
with torch.no_grad():
    outputs_8bit = model_8bit.generate(**inputs, max_new_tokens=50)
result_8bit = tokenizer.decode(outputs_8bit[0], skip_special_tokens=True)

print("Full precision output:\n", result_fp32)
print("\n8-bit quantized output:\n", result_8bit)

# Common variation: 4-bit quantization config example
quant_4bit_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)

# Load model with 4-bit quantization
model_4bit = AutoModelForCausalLM.from_pretrained(
    model_name,
    quantization_config=quant_4bit_config,
    device_map="auto"
)
model_4bit.eval()
