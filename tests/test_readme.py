"""The README's code runs as written: each section's Python blocks, with the model path pointed at a tiny
local Llama, executed in a temporary directory; then what the section promises is checked."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def run_section(section: str, model_dir, workdir, monkeypatch) -> dict:
    """Execute the ```python blocks under the README heading `section`; return their namespace."""
    text = README.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.DOTALL))
    code, found = re.subn(r'^path = "[^"]*"', f"path = {str(model_dir)!r}", code, count=1, flags=re.MULTILINE)
    assert found, f'the README section {section!r} names its model in a `path = "..."` line'
    monkeypatch.chdir(workdir)
    namespace = {}
    exec(compile(code, f"{README}: {section}", "exec"), namespace)
    return namespace


def test_fine_tune_with_lora(tiny_llama_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lowbit

    ns = run_section("Fine-tune with LoRA", tiny_llama_dir, tmp_path, monkeypatch)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "llama-nf4-merged")
    assert isinstance(again.model.layers[0].mlp.down_proj, lowbit.Linear4bit)
    ids = ns["ids"]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ns["merged"](input_ids=ids).logits)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=ns["config"])
        assert PeftModel.from_pretrained(base, tmp_path / "adapter")(input_ids=ids).logits.isfinite().all()


def test_serve_elsewhere(tiny_llama_dir, tmp_path, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    ns = run_section("Serve elsewhere", tiny_llama_dir, tmp_path, monkeypatch)
    assert isinstance(ns["served"].model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)


def test_better_4bit_at_the_same_size(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import lowbit

    ns = run_section("Better 4-bit at the same size", tiny_llama_dir, tmp_path, monkeypatch)
    layer = ns["model"].model.layers[0].mlp.down_proj
    assert isinstance(layer, lowbit.Linear4bit) and layer.scale_search
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "llama-nf4-aw")
    assert again.config.quantization_config.scale_search == "activation"
    ids = ns["ids"][:, :16]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ns["model"](input_ids=ids).logits)
