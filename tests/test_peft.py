"""LoRA on lowbit layers through plain peft (lowbit.integrations.peft), on a tiny random Llama."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.nn import QuantizedLinear

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402

from lowbit.integrations.peft import SUPPORTED_PEFT, lora_linear_class  # noqa: E402

CONFIGS = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "mixed": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", module_overrides={r"down_proj$": "int8"}),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def load(path, scheme):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=lowbit.LowbitConfig(**CONFIGS[scheme]))


def batch(length=24, seed=0):
    ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def quantized_state(model):
    """Every tensor of every lowbit layer (packed weights, scales, bias), by name."""
    return {f"{name}.{key}": t.clone() for name, m in model.named_modules() if isinstance(m, QuantizedLinear)
            for key, t in m.state_dict().items()}  # fmt: skip


def train(model, steps=40, lr=3e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_installed_peft_is_supported():
    assert peft.__version__ in SUPPORTED_PEFT


@pytest.mark.parametrize("scheme", CONFIGS)
def test_lora_wraps_lowbit_layers_and_trains_the_adapters_only(tiny_llama_dir, scheme):
    model = get_peft_model(load(tiny_llama_dir, scheme), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, lora_linear_class())}
    assert len(wrapped) == 3 * 2 and all(isinstance(m.get_base_layer(), QuantizedLinear) for m in wrapped.values())
    frozen = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    quantized = quantized_state(model)

    losses = train(model)
    assert losses[-1] < 0.7 * losses[0], losses

    assert all(torch.equal(t, quantized[k]) for k, t in quantized_state(model).items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_all_linear_targets_lowbit_layers_but_not_the_output_layer(tiny_llama_dir):
    base = load(tiny_llama_dir, "nf4")
    lowbit_layers = {n for n, m in base.named_modules() if isinstance(m, QuantizedLinear)}
    model = get_peft_model(base, LoraConfig(target_modules="all-linear"))
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, lora_linear_class())}
    assert wrapped == lowbit_layers and "lm_head" not in wrapped


def test_adapters_save_only_lora_tensors_and_reload_to_the_same_logits(tiny_llama_dir, tmp_path):
    model = get_peft_model(load(tiny_llama_dir, "nf4-dq"), LoraConfig(r=4, target_modules=TARGETS))
    train(model, steps=5)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    reloaded = PeftModel.from_pretrained(load(tiny_llama_dir, "nf4-dq"), tmp_path)
    ids = batch()["input_ids"]
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merge_requantizes_within_the_requantization_error_and_unmerge_is_exact(
    tiny_llama_dir, tmp_path, logit_error_bound, scheme
):
    # init_lora_weights=False: B is random too, so the adapters move the weights by more than a code step.
    model = get_peft_model(load(tiny_llama_dir, scheme), LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
    ids = batch()["input_ids"]
    before = quantized_state(model)

    model.merge_adapter()
    targeted = [k for k in before if k.endswith(".weight") and any(f"{t}.base_layer." in k for t in TARGETS)]
    assert len(targeted) == 6 and not any(torch.equal(quantized_state(model)[k], before[k]) for k in targeted)
    model.unmerge_adapter()
    assert all(torch.equal(t, before[k]) for k, t in quantized_state(model).items())

    twin = full_precision_twin(tiny_llama_dir, model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, lora_linear_class()) for m in merged.modules())
    # The twin computes (dequantized base + adapter) in float: each merged layer's own error against it (the
    # requantization error) bounds how far the logits may move (conftest.logit_error_bound).
    lowbit_layers = {n: m for n, m in merged.named_modules() if isinstance(m, QuantizedLinear)}
    bound, twin_logits = logit_error_bound(twin, ids, lowbit_layers)
    error = (logits(merged, ids) - twin_logits).norm()
    effect = (twin_logits - logits(load(tiny_llama_dir, scheme), ids)).norm()
    assert error <= bound and error < effect / 2, (error, bound, effect)

    merged.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again, ids), logits(merged, ids))


def full_precision_twin(path, peft_model):
    """The full-precision model with each lowbit layer's weight replaced by its dequantized weight, plus the
    adapters' delta where there are adapters: the float function the LoRA model computes."""
    twin = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, lora_linear_class()):
            weight = module.get_base_layer().dequantize().float() + module.get_delta_weight("default")
        elif isinstance(module, QuantizedLinear) and not name.endswith("base_layer"):
            weight = module.dequantize().float()
        else:
            continue
        twin.get_submodule(name).weight.data = weight.detach()
    return twin


def test_fan_in_fan_out_is_turned_off_as_for_nn_linear(tiny_llama_dir):
    config = LoraConfig(r=4, target_modules=["o_proj"], fan_in_fan_out=True, init_lora_weights=False)
    with pytest.warns(UserWarning, match="fan_in_fan_out=True does not apply to lowbit layers"):
        model = get_peft_model(load(tiny_llama_dir, "nf4"), config)
    layer = next(m for m in model.modules() if isinstance(m, lora_linear_class()))
    expected = layer.get_base_layer().dequantize().float() + layer.get_delta_weight("default")
    model.merge_adapter()
    merged = layer.get_base_layer()
    requantized = lowbit.Linear4bit.from_linear(torch.nn.Linear(merged.in_features, merged.out_features), quant_type="nf4")
    requantized.quantize_weight_(expected.detach())
    assert torch.equal(merged.weight, requantized.weight)  # the delta was added untransposed


@pytest.mark.parametrize("option, value, match", [
    ("use_dora", True, r"use_dora=.*not supported on lowbit layers"),
    ("lora_bias", True, r"lora_bias=.*not supported on lowbit layers"),
    ("init_lora_weights", "pissa", r"init_lora_weights='pissa' initializes adapters from the base weight"),
    ("init_lora_weights", "olora", r"init_lora_weights='olora'"),
])  # fmt: skip
def test_variants_that_read_the_base_weight_are_refused(tiny_llama_dir, option, value, match):
    with pytest.raises(ValueError, match=match):
        get_peft_model(load(tiny_llama_dir, "nf4"), LoraConfig(target_modules=TARGETS, **{option: value}))


def test_gradient_checkpointing_and_kbit_preparation(tiny_llama_dir):
    base = prepare_model_for_kbit_training(load(tiny_llama_dir, "nf4"), use_gradient_checkpointing=True)
    assert base.is_activation_checkpointing
    model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS))
    model.train()
    losses = train(model, steps=8)
    assert losses[-1] < losses[0]


def test_parameter_counts_include_the_quantized_weights(tiny_llama_dir):
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    quantized = load(tiny_llama_dir, "nf4")
    assert quantized.num_parameters() == full.num_parameters()
    assert quantized.num_parameters(exclude_embeddings=True) == full.num_parameters(exclude_embeddings=True)
    model = get_peft_model(quantized, LoraConfig(r=4, target_modules=TARGETS))
    trainable, total = model.get_nb_trainable_parameters()
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == lora and total == full.num_parameters() + lora


def test_an_unsupported_peft_version_fails_clearly(tiny_llama_dir, monkeypatch):
    code = f"""
import lowbit, peft, pytest
peft.__version__ = "0.1.0"
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r}, quantization_config=lowbit.LowbitConfig(load_in_8bit=True))
with pytest.raises(RuntimeError, match=r"works with peft .* and peft 0.1.0 is installed"):
    get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_lowbit_does_not_import_peft():
    code = "import sys, lowbit; assert 'peft' not in sys.modules; import peft; assert lowbit.integrations.peft.install.cache_info().currsize == 1"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_trainer_runs_without_bitsandbytes(tiny_llama_dir, tmp_path):
    # In a fresh interpreter where bitsandbytes cannot be imported, as on a machine without it.
    code = f"""
import sys
sys.modules["bitsandbytes"] = None
import torch, lowbit
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
model = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r},
    quantization_config=lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
model.print_trainable_parameters()
ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
data = [{{"input_ids": row, "labels": row}} for row in ids]
args = TrainingArguments({str(tmp_path)!r}, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)
result = Trainer(model=model, args=args, train_dataset=data).train()
print("loss", result.training_loss)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trainable params" in run.stdout and "loss" in run.stdout
