"""lowbit as a transformers quantization method: loading, accuracy, memory, saving, device maps, bad checkpoints."""

import json
import math
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto as hf_auto

import lowbit
from lowbit import Linear4bit, Linear8bit, LowbitConfig
from lowbit.integrations.transformers import QUANT_METHOD, LowbitHfQuantizer, register

REPO = Path(__file__).resolve().parents[1]

SCHEMES = {
    "int8": dict(load_in_8bit=True),
    "int8-wo": dict(load_in_8bit=True, llm_int8_weight_only=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
}
LOWBIT_LAYERS = (Linear4bit, Linear8bit)
TOP_LEVEL_MODULES = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")


def prompt(vocab_size=256, length=16):
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(1))


def lowbit_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LOWBIT_LAYERS)}


def load(path, scheme=None, **kwargs):
    if scheme is not None:
        kwargs["quantization_config"] = LowbitConfig(**SCHEMES[scheme])
    kwargs.setdefault("attn_implementation", "eager")  # the accuracy bound differentiates through attention
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --- registration ---------------------------------------------------------------------------------


def test_import_registers_config_and_quantizer():
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is LowbitConfig
    assert hf_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is LowbitHfQuantizer
    assert lowbit.BitsAndBytesConfig is LowbitConfig


def test_registration_survives_repeated_imports_and_reloads():
    # In a fresh interpreter, so the reloads do not leave this one with two generations of classes.
    code = """
import importlib
import lowbit
import lowbit.integrations.transformers as integration
from transformers.quantizers import auto
integration.register()  # again: a no-op
importlib.reload(integration)  # new class objects...
importlib.reload(lowbit)  # ...which re-importing the package registers in place of the old ones
assert auto.AUTO_QUANTIZER_MAPPING["lowbit"] is integration.LowbitHfQuantizer
assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lowbit"] is integration.LowbitConfig
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_registration_refuses_to_replace_another_packages_method(monkeypatch):
    class Foreign(hf_auto.HfQuantizer):
        pass

    monkeypatch.setitem(hf_auto.AUTO_QUANTIZER_MAPPING, QUANT_METHOD, Foreign)
    with pytest.raises(RuntimeError, match="already registered.*Foreign"):
        register()


# --- quantize while loading -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, scheme",
    [("aligned", s) for s in SCHEMES] + [("odd", "int8"), ("odd", "nf4")],
)
def test_quantizes_each_linear_as_it_loads(tiny_llama_factory, logit_error_bound, shape, scheme):
    path = tiny_llama_factory(shape)
    fp = load(path)
    quantized, info = load(path, scheme, output_loading_info=True)
    assert not any(info.values()), info

    layers = lowbit_layers(quantized)
    linears = {name for name, m in fp.named_modules() if isinstance(m, nn.Linear)}
    assert set(layers) == linears - {"lm_head"}
    assert type(quantized.lm_head) is nn.Linear
    assert torch.equal(quantized.lm_head.weight, fp.lm_head.weight)

    # What was quantized while loading is exactly what the layer API makes of the same weights.
    config = LowbitConfig(**SCHEMES[scheme])
    for name, layer in layers.items():
        expected = lowbit.schemes.get(config.scheme_for(name)).from_linear(fp.get_submodule(name), config)
        assert_same_state(layer, expected)

    # Accuracy against full precision, within the bound derived from these layers' own errors (conftest).
    ids = prompt()
    bound, fp_logits = logit_error_bound(fp, ids, layers)
    error = (logits(quantized, ids) - fp_logits).norm()
    assert 0 < error <= bound, f"logit error {error:.4g} exceeds the first-order bound {bound:.4g}"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_memory_footprint_is_the_quantized_size(tiny_llama_dir, scheme):
    fp, quantized = load(tiny_llama_dir), load(tiny_llama_dir, scheme)
    config = LowbitConfig(**SCHEMES[scheme])
    # Bytes of each quantized weight by the format (DESIGN.md "Numerics"), replacing its float32 bytes.
    expected = fp.get_memory_footprint()
    for name, layer in lowbit_layers(quantized).items():
        n = layer.in_features * layer.out_features
        expected -= 4 * n
        if scheme.startswith("int8"):
            expected += n + 4 * layer.out_features  # int8 CB + float32 SCB per row
        else:
            blocks = math.ceil(n / config.blocksize)
            expected += math.ceil(n / 2) + 16 * 4  # packed nibbles + the 16-entry code
            if config.bnb_4bit_use_double_quant:
                expected += blocks + 4 * math.ceil(blocks / 256) + 256 * 4  # uint8 absmax, nested absmax, 8-bit map
            else:
                expected += 4 * blocks  # float32 absmax
    # Exact: no float copy of a weight, no stray buffer survives loading. (The ratio to full precision is
    # far from bits/32 here only because embeddings and lm_head are a quarter of this tiny model.)
    assert quantized.get_memory_footprint() == expected, (quantized.get_memory_footprint(), expected)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_each_weight_is_quantized_and_dropped_as_it_loads(tiny_llama_dir, monkeypatch, scheme):
    # Peak memory stays near the quantized size only if no two full-precision weights are ever alive together:
    # each one is quantized as transformers reads it and freed before the next is read. Weak references to
    # the weights handed to quantize_weight_ show exactly that (CPython frees a tensor with its last reference).
    # (Process RSS cannot show it at this size, and counts the memory-mapped checkpoint besides.)
    earlier, alive_at_each_call, still_on_meta = [], [], []
    for cls in LOWBIT_LAYERS:

        def spy(self, weight, original=cls.quantize_weight_):
            alive_at_each_call.append(sum(ref() is not None for ref in earlier))
            still_on_meta.append(sum(m.weight.is_meta for m in lowbit_layers(model_being_loaded[0]).values()))
            earlier.append(weakref.ref(weight))
            return original(self, weight)

        monkeypatch.setattr(cls, "quantize_weight_", spy)

    model_being_loaded = []
    original_preprocess = LowbitHfQuantizer._process_model_before_weight_loading

    def remember_model(self, model, **kwargs):
        model_being_loaded.append(model)
        return original_preprocess(self, model, **kwargs)

    monkeypatch.setattr(LowbitHfQuantizer, "_process_model_before_weight_loading", remember_model)
    model = load(tiny_llama_dir, scheme)

    n = len(lowbit_layers(model))
    assert alive_at_each_call == [0] * n  # never a second full-precision weight alive
    assert still_on_meta == list(range(n, 0, -1))  # one layer filled per weight read, not all at the end
    assert all(ref() is None for ref in earlier)


# --- save and reload ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_and_reload_is_identical(tiny_llama_dir, tmp_path, scheme):
    quantized = load(tiny_llama_dir, scheme)
    quantized.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "lowbit" and saved["bits"] == (8 if scheme.startswith("int8") else 4)
    assert not saved.get("load_in_4bit") and not saved.get("load_in_8bit")  # else a reload goes to bitsandbytes

    reloaded, info = load(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert isinstance(reloaded.config.quantization_config, LowbitConfig)
    assert reloaded.config.quantization_config == quantized.config.quantization_config
    assert_same_state(reloaded, quantized)
    ids = prompt()
    assert torch.equal(logits(reloaded, ids), logits(quantized, ids))
    generate = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(reloaded.generate(ids, **generate), quantized.generate(ids, **generate))

    # A reloaded model saves again (its pre-quantized loading must reverse cleanly).
    reloaded.save_pretrained(tmp_path / "again")
    resaved = load_file(tmp_path / "again" / "model.safetensors")
    assert resaved.keys() == load_file(tmp_path / "model.safetensors").keys()


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_a_process_that_never_imports_lowbit_loads_its_checkpoints(tiny_llama_dir, tmp_path, scheme):
    # Plain transformers code in a fresh interpreter: lowbit_autoload.pth (installed with lowbit) has transformers
    # import lowbit when it meets quant_method "lowbit", rather than load the int8 codes as float weights.
    quantized = load(tiny_llama_dir, scheme)
    quantized.save_pretrained(tmp_path / "saved")
    ids = prompt()
    torch.save(logits(quantized, ids), tmp_path / "want.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'lowbit' not in sys.modules\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'saved')!r}, attn_implementation='eager')\n"
        "assert 'lowbit' in sys.modules, 'transformers loaded the checkpoint without lowbit'\n"
        f"ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))\n"
        "with torch.no_grad():\n"
        f"    assert torch.equal(model(ids).logits, torch.load({str(tmp_path / 'want.pt')!r})), 'other logits'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_config_round_trips_through_config_json(tiny_llama_dir, tmp_path):
    config = LowbitConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        blocksize=128,
        llm_int8_skip_modules=["o_proj"],
        module_overrides={r"\.mlp\.down_proj$": "int8"},
    )
    load(tiny_llama_dir, quantization_config=config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["bnb_4bit_compute_dtype"] == "bfloat16" and saved["blocksize"] == 128
    assert not saved.get("load_in_4bit") and not saved.get("load_in_8bit")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config == config


def test_skip_modules_and_overrides_are_honoured(tiny_llama_dir, tmp_path):
    config = LowbitConfig(
        load_in_8bit=True,
        llm_int8_skip_modules=["down_proj"],
        module_overrides={r"\.mlp\.(gate|up)_proj$": "nf4"},
    )
    model = load(tiny_llama_dir, quantization_config=config)

    def kinds(m):
        return {
            name: (type(layer).__name__, getattr(layer, "quant_type", None))
            for name, layer in m.named_modules()
            if isinstance(layer, (nn.Linear, *LOWBIT_LAYERS))
        }

    found = kinds(model)
    for name, kind in found.items():
        if name.endswith("down_proj"):
            assert kind == ("Linear", None), name
        elif name.endswith(("gate_proj", "up_proj")):
            assert kind == ("Linear4bit", "nf4"), name
        else:  # lm_head too: the skip list replaced the default (as in transformers + bitsandbytes, and quantize_model)
            assert kind == ("Linear8bit", None), name
    assert found["lm_head"] == ("Linear8bit", None)
    model.save_pretrained(tmp_path)
    assert kinds(AutoModelForCausalLM.from_pretrained(tmp_path)) == found


def test_tied_embeddings_stay_full_precision_and_tied(tiny_llama_factory, tmp_path):
    model = load(tiny_llama_factory(tie_word_embeddings=True), "nf4")
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    reloaded = load(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(logits(reloaded, prompt()), logits(model, prompt()))


def test_dequantize_gives_back_plain_linears(tiny_llama_dir):
    model = load(tiny_llama_dir, "nf4")
    expected = {name: layer.dequantize() for name, layer in lowbit_layers(model).items()}
    before = logits(model, prompt())
    model.dequantize()
    assert not lowbit_layers(model) and not hasattr(model.config, "quantization_config")
    for name, weight in expected.items():
        assert torch.equal(model.get_submodule(name).weight, weight)
    # Same weights, now through F.linear instead of lowbit's kernel: float32 rounding differences only.
    torch.testing.assert_close(logits(model, prompt()), before)


# --- device maps ----------------------------------------------------------------------------------


def test_device_maps_all_load_the_same_model(tiny_llama_dir):
    per_module = dict.fromkeys(TOP_LEVEL_MODULES, "cpu")
    reference = load(tiny_llama_dir, "nf4")
    for device_map in ("cpu", "auto", {"": "cpu"}, per_module):
        model = load(tiny_llama_dir, "nf4", device_map=device_map)
        assert_same_state(model, reference)
        assert torch.equal(logits(model, prompt()), logits(reference, prompt())), device_map


def test_disk_offload_is_refused_by_name(tiny_llama_dir, tmp_path):
    device_map = dict.fromkeys(TOP_LEVEL_MODULES, "cpu") | {"model.layers": "disk"}
    with pytest.raises(ValueError, match="disk.*model.layers"):
        load(tiny_llama_dir, "int8", device_map=device_map, offload_folder=tmp_path)


# --- bad checkpoints ------------------------------------------------------------------------------


@pytest.fixture()
def saved(tiny_llama_dir, tmp_path):
    """`saved(scheme, edit) -> path`: a saved quantized model whose tensors `edit(dict)` has changed."""

    def make(scheme, edit):
        path = tmp_path / scheme
        load(tiny_llama_dir, scheme).save_pretrained(path)
        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path

    return make


LAYER = "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize(
    "scheme, key, message",
    [
        ("nf4", "weight.absmax", r"weight\.absmax"),
        ("nf4-dq", "weight.nested_absmax", r"weight\.nested_absmax.*double quantization"),
        ("fp4", "weight.quant_state.bitsandbytes__fp4", r"exactly one of .*quant_state"),
        ("int8", "SCB", r"no `SCB`"),
        ("int8", "weight", r"no packed `weight`"),
    ],
)
def test_missing_quant_state_is_named_before_loading(saved, scheme, key, message):
    path = saved(scheme, lambda tensors: tensors.pop(f"{LAYER}.{key}"))
    with pytest.raises(ValueError, match=rf"{LAYER}: .*{message}"):
        AutoModelForCausalLM.from_pretrained(path)


def test_quantized_tensors_for_a_full_precision_module_are_named(saved):
    def quantize_norm_too(tensors):
        tensors["model.norm.SCB"] = torch.ones(1)

    with pytest.raises(ValueError, match=r"model\.norm: .*keeps this module in full precision"):
        AutoModelForCausalLM.from_pretrained(saved("int8", quantize_norm_too))


def _rewrite_quant_state(tensors, change):
    key = f"{LAYER}.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors[key].tolist()))
    change(state)
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: _rewrite_quant_state(t, lambda s: s.update(shape=[64, 128])), r"is \[64, 128\] but the model's"),
        (lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"][:-5]}), "packed weight has .* bytes"),
    ],
    ids=["quant_state-shape", "truncated-weight"],
)
def test_inconsistent_quant_state_fails_loading_with_the_reason(saved, edit, message):
    # The exception itself names the layer and says what is wrong (not only transformers' log).
    with pytest.raises(ValueError, match=rf"{re.escape(LAYER)}: .*{message}"):
        AutoModelForCausalLM.from_pretrained(saved("nf4", edit))


# --- the seed document's script -------------------------------------------------------------------


@pytest.mark.slow
def test_seed_example_runs_offline_on_the_built_in_model(tmp_path):
    script = REPO / "examples" / "seed_accuracy_tradeoff.py"
    env = dict(os.environ, TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1", LOWBIT_CACHE_DIR=str(tmp_path))
    env.pop("LOWBIT_EXAMPLE_MODEL", None)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "8-bit quantized output:" in run.stdout and (tmp_path / "SmolLM2-135M-Instruct" / "config.json").is_file()


def test_seed_example_runs_on_a_local_checkpoint(tiny_llama_dir):
    script = REPO / "examples" / "seed_accuracy_tradeoff.py"
    env = dict(os.environ, TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, str(script), str(tiny_llama_dir)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Full precision output:" in run.stdout and "8-bit quantized output:" in run.stdout
