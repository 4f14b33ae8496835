"""GPTQ (quantizer="gptq"): lower output error than rounding to nearest on correlated inputs, the same formats
(checkpoints reload bit for bit in lowbit and in bitsandbytes), the sequential pipeline, and its refusals."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit import Linear4bit, Linear8bit, LowbitConfig, ops
from lowbit.gptq import gptq_4bit

IDS = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))


def _correlated_inputs(K, rows=1024, seed=0):
    """Inputs whose features are correlated and differ in scale (as a model's are): where GPTQ has room to act."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) * 0.2 + torch.eye(K)
    return (torch.randn(rows, K, generator=g) @ mix) * (torch.rand(K, generator=g) * 3 + 0.1)


def _output_error(layer, linear, X):
    with torch.no_grad():
        return ((layer(X) - linear(X)).norm() / linear(X).norm()).item()


@pytest.mark.parametrize("make", [
    lambda linear, h: Linear4bit.from_linear(linear, quant_type="nf4", hessian=h),
    lambda linear, h: Linear4bit.from_linear(linear, quant_type="fp4", double_quant=True, hessian=h),
    lambda linear, h: Linear4bit.from_linear(linear, quant_type="nf4", scale_search=True, importance=torch.diagonal(h).clone(), hessian=h),
    lambda linear, h: Linear8bit.from_linear(linear, weight_only=True, hessian=h),
])  # fmt: skip
def test_gptq_lowers_the_output_error_against_round_to_nearest(make):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    X = _correlated_inputs(256)
    hessian = X.T @ X / X.shape[0]
    gptq = make(linear, hessian)
    same_format = ({"quant_type": gptq.quant_type, "double_quant": gptq.double_quant} if isinstance(gptq, Linear4bit)
                   else {"weight_only": True})  # fmt: skip
    plain = type(gptq).from_linear(linear, **same_format)  # rounded to nearest
    assert _output_error(gptq, linear, X) < 0.85 * _output_error(plain, linear, X)


def test_gptq_keeps_the_block_structure_and_refuses_straddling_blocks():
    W, X = torch.randn(16, 128), _correlated_inputs(128)
    packed, absmax = gptq_4bit(W, X.T @ X, 64, "nf4")
    assert packed.shape == (16 * 128 // 2, 1) and absmax.shape == (16 * 2,)
    assert torch.isfinite(ops.dequantize_4bit(packed, absmax, 64, "nf4", (16, 128), torch.float32)).all()
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        gptq_4bit(torch.randn(16, 100), torch.eye(100), 64, "nf4")
    with pytest.raises(ValueError, match="hessian must be the"):
        Linear4bit.from_linear(torch.nn.Linear(128, 16), hessian=torch.eye(64))


@pytest.mark.parametrize("kwargs", [dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                                    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", scale_search="activation",
                                         bnb_4bit_use_double_quant=True),
                                    dict(load_in_8bit=True, llm_int8_weight_only=True)])  # fmt: skip
def test_a_gptq_model_saves_and_reloads_bit_for_bit(tiny_llama_dir, tmp_path, kwargs):
    config = LowbitConfig(quantizer="gptq", **kwargs)
    model = lowbit.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config, calibration=IDS)
    model.config.quantization_config = config
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization_config.quantizer == "gptq"
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_a_gptq_checkpoint_loads_in_bitsandbytes(tiny_llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    config = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", quantizer="gptq")
    model = lowbit.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config, calibration=IDS)
    lowbit.export_bitsandbytes(model, tmp_path)
    served = AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers' bitsandbytes loader
    assert type(served.model.layers[0].mlp.down_proj).__module__.startswith("bitsandbytes")
    # bitsandbytes holds exactly GPTQ's codes and scales (it computes with them in its own rounding, which the
    # export tests bound).
    theirs, ours = served.state_dict(), model.state_dict()
    quantized = [k for k in ours if k.endswith((".weight", ".weight.absmax")) and ".layers." in k and "norm" not in k]
    assert quantized and all(torch.equal(theirs[k].cpu(), ours[k]) for k in quantized)


def test_the_pipeline_is_sequential_and_atomic(tiny_llama_factory, tiny_llama_dir):
    # Block 1's layers are quantized from the inputs block 0 gives once quantized: not what one pass over the
    # full-precision model would give.
    config = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", quantizer="gptq")
    model = lowbit.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config, calibration=IDS)
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    grams = lowbit.calibrate.input_grams(full, {"q": full.model.layers[1].self_attn.q_proj}, IDS)
    one_pass = Linear4bit.from_linear(full.model.layers[1].self_attn.q_proj, quant_type="nf4", hessian=grams["q"])
    assert not torch.equal(one_pass.weight, model.model.layers[1].self_attn.q_proj.weight)
    # A layer GPTQ cannot take (84 inputs: blocks would straddle rows) leaves the whole model as it was.
    odd = AutoModelForCausalLM.from_pretrained(tiny_llama_factory("odd"))
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        lowbit.quantize_model(odd, config, calibration=IDS)
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in odd.modules())


@pytest.mark.parametrize("skip", [(), ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                       "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
                                       "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                       "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj")])  # fmt: skip
def test_cached_block_inputs_give_what_whole_model_passes_give(tiny_llama_factory, monkeypatch, skip):
    # The decoder stack runs block by block from cached inputs (the whole model once per calibration batch, to
    # capture them); the result is bit for bit what running the whole model once per block gives, also when the
    # first block has nothing to quantize (the chain starts at block 1) and a block is partly skipped. Three layers,
    # two batches.
    path = tiny_llama_factory(num_hidden_layers=3)
    config = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", quantizer="gptq")
    batches = [IDS[:1], IDS[1:, :40]]
    model = AutoModelForCausalLM.from_pretrained(path)
    forwards = []
    model.register_forward_pre_hook(lambda *args: forwards.append(1))
    lowbit.quantize_model(model, config, calibration=batches, skip=skip)
    assert len(forwards) == len(batches)
    monkeypatch.setattr(lowbit.quantize, "_block_chain", lambda *args: None)
    whole = lowbit.quantize_model(AutoModelForCausalLM.from_pretrained(path), config, calibration=batches, skip=skip)
    ours, theirs = model.state_dict(), whole.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_block_chain_declines_a_stack_whose_blocks_do_not_chain(tiny_llama_dir):
    # Where something runs between two blocks, block 0's output is not block 1's input: the chain says so (and
    # GPTQ then runs the whole model per block).
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layers = model.model.layers
    assert lowbit.calibrate.BlockChain.capture(model, layers, 0, IDS) is not None
    layers[1].register_forward_pre_hook(lambda module, args: (args[0] * 2, *args[1:]))
    assert lowbit.calibrate.BlockChain.capture(model, layers, 0, IDS) is None


def test_gptq_needs_calibration_and_a_model_run(tiny_llama_dir):
    config = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", quantizer="gptq")
    with pytest.raises(ValueError, match="pass calibration=<token ids>"):
        lowbit.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    with pytest.raises(ValueError, match=r"load in full precision, then lowbit.quantize_model"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        LowbitConfig(load_in_4bit=True, quantizer="awq")


def test_compare_runs_the_gptq_presets(tiny_llama_dir):
    from lowbit.compare import compare

    report = compare(tiny_llama_dir, "nf4,nf4-gptq,int8-wo-gptq", prompts=[], timing=False, progress=False,
                     max_tokens=160, context=64, stride=32)  # fmt: skip
    assert [r.name for r in report.results] == ["full", "nf4", "nf4-gptq", "int8-wo-gptq"]
    assert "for GPTQ" in report.calibration and report["nf4-gptq"].layers


def test_the_budget_proposal_works_over_gptq_presets(tiny_llama_dir):
    from lowbit.compare import compare

    report = compare(tiny_llama_dir, "nf4-gptq,int8-wo-gptq", prompts=[], timing=False, progress=False,
                     max_tokens=160, context=64, stride=32, max_ppl_increase=0.0005)  # fmt: skip
    proposal = report.proposal
    assert proposal.base in ("nf4-gptq", "int8-wo-gptq") and proposal.config["quantizer"] == "gptq"
    if proposal.promoted:  # the mix was quantized with GPTQ too, and measured
        mixed = report["mixed"]
        assert mixed.config["module_overrides"] == proposal.overrides and proposal.measured_change == mixed.ppl_change
