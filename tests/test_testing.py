"""`lowbit.testing`: budget assertions for users' own accuracy tests."""

import pytest

import lowbit
from lowbit.testing import assert_within_budget, measure

TEXT = "Quantized models should stay close to full precision. " * 4
SMALL = dict(max_tokens=150, context=64, stride=32)


def test_measure_returns_figures(tiny_llama_dir):
    r = measure(tiny_llama_dir, lowbit.LowbitConfig(load_in_8bit=True), TEXT, **SMALL)
    assert r.name == "int8" and r.agreement.positions == 149
    assert r.layers == [] and r.speed is None and r.generations == []


def test_within_budget_passes_and_returns_the_result(tiny_llama_dir):
    r = assert_within_budget(tiny_llama_dir, lowbit.LowbitConfig(load_in_8bit=True), TEXT,
                             max_ppl_increase=0.05, min_top1=0.8, min_top5=0.8, max_kl=0.05, **SMALL)  # fmt: skip
    assert r.ppl_change <= 0.05


def test_failure_shows_every_figure_against_its_budget(tiny_llama_dir):
    config = lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
    with pytest.raises(AssertionError) as failure:
        assert_within_budget(tiny_llama_dir, config, TEXT, max_ppl_increase=-1.0, min_top1=0.0, **SMALL)
    message = str(failure.value)
    assert "fp4 is outside its accuracy budget (149 positions" in message
    lines = {line.split("  ")[1]: line.split() for line in message.splitlines()[1:]}
    assert lines["perplexity change"][-3:] == ["≤", "-100.00%", "FAIL"]  # an impossible budget fails...
    assert lines["top-1 agreement"][-3:] == ["≥", "0.00%", "ok"]  # ...a trivial one holds
    assert lines["mean KL (nats)"][-2:] == ["(no", "budget)"]
