"""The README's code runs as written: each section's Python blocks, with the model path pointed at a tiny
local Llama, executed in a temporary directory; then what the section promises is checked."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def sections_with_python() -> dict[str, str]:
    """Every README heading (## or ###) whose own text has ```python blocks, with their code."""
    found = {}
    for part in re.split(r"\n(?=#{2,3} )", README.read_text()):
        heading = part.split("\n", 1)[0].lstrip("#").strip()
        code = re.findall(r"```python\n(.*?)```", part, re.DOTALL)
        if code:
            found[heading] = "\n".join(code)
    return found


def run_section(section: str, model_dir, workdir, monkeypatch) -> dict:
    """Execute the ```python blocks under the README heading `section` as written, in `workdir`, with the built-in
    model (lowbit.compare.default_model_directory()) standing in for the tiny one at `model_dir`; return their
    namespace."""
    import lowbit.compare

    monkeypatch.setattr(lowbit.compare, "default_model_directory", lambda *args, **kwargs: str(model_dir))
    code = sections_with_python()[section]
    monkeypatch.chdir(workdir)
    namespace = {}
    exec(compile(code, f"{README}: {section}", "exec"), namespace)
    return namespace


TESTED_SECTIONS = {"Use it from transformers", "Use it without transformers", "Better 4-bit at the same size",
                   "Fine-tune with LoRA", "Several GPUs: FSDP2", "Serve elsewhere", "Accuracy report",
                   "Accuracy budgets in your own tests"}  # fmt: skip


def test_every_python_snippet_is_run_by_a_test():
    assert set(sections_with_python()) == TESTED_SECTIONS


def test_use_it_from_transformers(tiny_llama_dir, tmp_path, monkeypatch):
    import lowbit

    ns = run_section("Use it from transformers", tiny_llama_dir, tmp_path, monkeypatch)
    assert isinstance(ns["again"].model.layers[0].mlp.down_proj, lowbit.Linear8bit)
    assert isinstance(ns["model"].model.layers[0].mlp.down_proj, lowbit.Linear8bit)  # the bitsandbytes checkpoint


def test_several_gpus_fsdp2(tiny_llama_dir, tmp_path, monkeypatch):
    import torch.distributed as dist

    import lowbit
    from lowbit.fsdp import is_prepared

    # The snippet runs inside a launched process; here, a process group of one.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ns = run_section("Several GPUs: FSDP2", tiny_llama_dir, tmp_path, monkeypatch)
        model = ns["model"]
        layers = [m for m in model.modules() if isinstance(m, lowbit.Linear4bit)]
        assert layers and all(is_prepared(m) and hasattr(m.weight, "to_local") for m in layers)  # sharded by FSDP2
        ids = torch.randint(0, 256, (1, 8))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()


def test_use_it_without_transformers(tiny_llama_dir, tmp_path, monkeypatch):
    import lowbit

    ns = run_section("Use it without transformers", tiny_llama_dir, tmp_path, monkeypatch)
    assert isinstance(ns["model"][0], lowbit.Linear4bit) and isinstance(ns["layer"], lowbit.Linear4bit)


def test_accuracy_report(tiny_llama_dir, tmp_path, monkeypatch):
    ns = run_section("Accuracy report", tiny_llama_dir, tmp_path, monkeypatch)
    assert [r.name for r in ns["report"].results][:3] == ["full", "int8", "nf4"]
    assert {"report.md", "summary.csv"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_accuracy_budgets_in_your_own_tests(tiny_llama_dir, tmp_path, monkeypatch):
    ns = run_section("Accuracy budgets in your own tests", tiny_llama_dir, tmp_path, monkeypatch)
    try:  # a tiny random model may miss SmolLM2's budget: what matters is that the snippet reaches a verdict
        ns["test_int8_stays_within_budget"]()
    except AssertionError as e:
        assert "perplexity" in str(e)


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
