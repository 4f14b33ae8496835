"""`lowbit.compare` end to end on a tiny saved Llama (random weights, byte-level tokenizer)."""

import pytest
import torch

import lowbit
from lowbit.compare import compare

# Enough tokens for three windows; the tiny model's positions stop at 256.
SMALL = dict(max_tokens=160, context=64, stride=32, new_tokens=4, prompts=["Hello"], progress=False)


@pytest.fixture(scope="module")
def report(tiny_llama_dir):
    return compare(tiny_llama_dir, configs="int8,nf4,fp4", **SMALL)


def test_report_structure(report):
    assert [r.name for r in report.results] == ["full", "int8", "nf4", "fp4"]
    assert report.tokens == 159 and report.windows == 4 and report.context == 64
    assert report.sensitivity_tokens == 63  # the first window's scored positions
    full = report.full
    assert full.agreement is None and full.ppl_change == 0 and full.linear_ratio == 1.0
    for r in report.results[1:]:
        a = r.agreement
        assert a.positions == 159
        assert a.kl_mean >= 0 and a.kl_p99 >= 0
        assert 0 <= a.top1 <= 1 and 0 <= a.top5 <= 1
        assert r.perplexity == pytest.approx(full.perplexity * (1 + r.ppl_change))
        assert r.speed.prefill_ms > 0 and r.speed.decode_ms_per_token > 0
        assert len(r.generations) == 1 and len(r.generations[0].tokens) <= 4


def test_the_costliest_layers_are_measured_alone(report, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from lowbit.compare.api import MEASURED_LAYERS
    from lowbit.compare.data import default_text, strided_windows
    from lowbit.compare.evaluate import summed_nll
    from lowbit.compare.presets import preset

    nf4 = report["nf4"]
    measured = [layer for layer in nf4.layers if layer.measured_ppl_change is not None]
    by_estimate = sorted(nf4.layers, key=lambda e: abs(e.est_ppl_change), reverse=True)
    assert measured and {e.name for e in measured} == {e.name for e in by_estimate[:MEASURED_LAYERS]}
    # The measured figure is what quantizing that layer alone (module_overrides) does to the first window.
    layer = measured[0]
    config = preset("nf4")
    config.module_overrides = {f"^{layer.name}$": "nf4", ".": "none"}
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    alone = lowbit.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    ids = torch.tensor(report_tokenizer(tiny_llama_dir)(default_text()).input_ids[:160])
    window = strided_windows(len(ids), 64, 32)[:1]
    expected = torch.expm1(torch.tensor((summed_nll(alone, ids, window) - summed_nll(full, ids, window)) / 63.0))
    assert layer.measured_ppl_change == pytest.approx(float(expected), rel=1e-6, abs=1e-12)
    rho, n = report.estimate_agreement()["nf4"]
    assert n == len(measured) and (rho is None or -1 <= rho <= 1)


def report_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_memory_shrinks_as_bits_drop(report):
    full, int8, nf4 = report.full, report["int8"], report["nf4"]

    def quantized_ratio(r):
        return sum(layer.bytes for layer in r.layers) / sum(layer.full_bytes for layer in r.layers)

    # int8 stores 1 byte per weight plus a float32 scale per row: just over a quarter of float32.
    assert 0.25 < quantized_ratio(int8) < 0.27
    # 4-bit: half a byte per weight plus a float32 absmax per 64 weights (1/16 byte): ≈ 0.14.
    assert 0.125 < quantized_ratio(nf4) < 0.145
    # The untied lm_head stays in full precision but counts among the linear layers.
    assert nf4.linear_ratio < int8.linear_ratio < full.linear_ratio == 1.0
    assert nf4.total_bytes < int8.total_bytes < full.total_bytes


def test_layer_sensitivity_covers_every_quantized_linear(report):
    names = {layer.name for layer in report["nf4"].layers}
    assert len(names) == 2 * 7  # two decoder layers of q, k, v, o, gate, up, down
    assert "lm_head" not in names
    for layer in report["nf4"].layers:
        assert layer.scheme == "nf4" and 0 < layer.rel_error < 0.5
        assert layer.bytes < layer.full_bytes
    # A 4-bit layer errs several times more than the same layer in int8.
    int8_errors = {layer.name: layer.rel_error for layer in report["int8"].layers}
    assert all(layer.rel_error > 3 * int8_errors[layer.name] for layer in report["nf4"].layers)


def test_vacuous_comparisons_are_refused(tiny_llama_dir, tmp_path):
    # A config that quantizes nothing, or a model that is already quantized, would read "no change" everywhere.
    nothing = lowbit.LowbitConfig(load_in_8bit=True, module_overrides={".*": "none"})
    with pytest.raises(ValueError, match="the config quantizes no layer"):
        compare(tiny_llama_dir, {"nothing": nothing}, timing=False, **SMALL)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=lowbit.LowbitConfig(load_in_8bit=True)
                                         ).save_pretrained(tmp_path)  # fmt: skip
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is already quantized"):
        compare(tmp_path, "nf4", timing=False, **SMALL)
    from lowbit.testing import assert_within_budget

    with pytest.raises(ValueError, match="is already quantized"):
        assert_within_budget(tmp_path, lowbit.LowbitConfig(load_in_4bit=True))


def test_in_memory_model_is_left_unquantized(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    report = compare(model, "int8", text="The quick brown fox jumps over the lazy dog. " * 4,
                     tokenizer=tokenizer, sensitivity=False, timing=False, **SMALL)  # fmt: skip
    assert report.text_source == "the given text" and report.tokens == 159  # 160 byte tokens kept
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert report["int8"].layers == [] and report.sensitivity_tokens == 0


def test_budget_proposes_and_measures_a_mix(tiny_llama_dir):
    report = compare(tiny_llama_dir, "int8,nf4", timing=False, max_ppl_increase=0.0005, **SMALL)
    p = report.proposal
    assert p.base in ("int8", "nf4") and p.budget == 0.0005
    if p.promoted:  # the measured mix is in the report, and its verdict follows from its numbers
        mixed = report["mixed"]
        assert mixed.config["module_overrides"] == p.overrides
        assert p.measured_change == mixed.ppl_change and p.met == (mixed.ppl_change <= 0.0005)
        if p.high == "int8":
            assert sum(layer.scheme == "int8" for layer in mixed.layers) == p.promoted
        else:  # promoted to full precision: those layers are no longer quantized at all
            assert len(mixed.layers) == 14 - p.promoted
    assert "Budget: perplexity +0.05%" in report.to_markdown()


def test_the_package_is_callable_and_its_modules_import():
    import lowbit.compare.report  # the function once shadowed the package, so this failed

    assert lowbit.compare.report.Report is lowbit.compare.Report and callable(lowbit.compare)
    assert lowbit.compare.compare is compare


def test_bad_arguments_fail_before_loading(tiny_llama_dir):
    with pytest.raises(ValueError, match="unknown config 'int3'"):
        compare(tiny_llama_dir, "int8,int3")
    with pytest.raises(ValueError, match="sensitivity"):
        compare(tiny_llama_dir, "int8", sensitivity=False, max_ppl_increase=0.01)
    with pytest.raises(ValueError, match="tokenizer"):
        compare(torch.nn.Linear(2, 2), "int8")
