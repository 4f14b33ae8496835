"""LowbitConfig (BitsAndBytesConfig-compatible) and quantize_model on plain nn.Modules."""

import inspect

import pytest
import torch
import torch.nn as nn
import transformers

import lowbit
from lowbit import Linear4bit, Linear8bit, LowbitConfig, quantize_model
from lowbit.schemes import SCHEMES

BNB_FIELDS = [
    "load_in_8bit", "load_in_4bit", "llm_int8_threshold", "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
]  # fmt: skip


def test_bitsandbytes_config_is_lowbit_config():
    assert lowbit.BitsAndBytesConfig is LowbitConfig


def test_every_bitsandbytes_field_has_the_same_name_and_default():
    ours = inspect.signature(LowbitConfig.__init__).parameters
    theirs = inspect.signature(transformers.BitsAndBytesConfig.__init__).parameters
    for name in BNB_FIELDS:
        assert name in ours and name in theirs, name
        assert ours[name].default == theirs[name].default, name


def test_seed_style_configs():
    c8 = lowbit.BitsAndBytesConfig(load_in_8bit=True)
    assert c8.scheme_for("model.layers.0.mlp.down_proj") == "int8" and c8.llm_int8_threshold == 6.0
    c4 = lowbit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)
    assert c4.scheme_for("model.layers.0.self_attn.q_proj") == "fp4"  # bitsandbytes' default quant type
    assert SCHEMES["fp4"].layer_options(c4)["compute_dtype"] == torch.float16


def test_lm_head_and_skip_modules():
    cfg = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert cfg.scheme_for("lm_head") is None
    cfg = LowbitConfig(load_in_8bit=True, llm_int8_skip_modules=["mlp.down_proj", "o_proj"])
    assert cfg.scheme_for("model.layers.3.mlp.down_proj") is None
    assert cfg.scheme_for("model.layers.3.self_attn.o_proj") is None
    assert cfg.scheme_for("model.layers.3.mlp.up_proj") == "int8"
    assert cfg.scheme_for("model.layers.3.self_attn.o_proj_extra") == "int8"  # whole components only
    assert cfg.scheme_for("lm_head") == "int8"  # an explicit skip list replaces the default


def test_module_overrides_mix_precisions():
    cfg = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                       module_overrides={r"down_proj$": "int8", r"layers\.0\.": "none", "q_proj": "fp4"})  # fmt: skip
    assert cfg.scheme_for("model.layers.1.mlp.down_proj") == "int8"
    assert cfg.scheme_for("model.layers.0.mlp.down_proj") == "int8"  # first match wins
    assert cfg.scheme_for("model.layers.0.mlp.up_proj") is None
    assert cfg.scheme_for("model.layers.2.self_attn.q_proj") == "fp4"
    assert cfg.scheme_for("model.layers.2.self_attn.k_proj") == "nf4"
    only = LowbitConfig(module_overrides={"down_proj": "int8"})
    assert only.scheme_for("mlp.down_proj") == "int8" and only.scheme_for("mlp.up_proj") is None


def test_to_dict_round_trip_without_load_in_flags():
    cfg = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16, blocksize=128, module_overrides={"down": "int8"})  # fmt: skip
    d = cfg.to_dict()
    assert "load_in_4bit" not in d and "load_in_8bit" not in d
    assert d["bits"] == 4 and d["quant_method"] == "lowbit" and d["bnb_4bit_compute_dtype"] == "bfloat16"
    back = LowbitConfig.from_dict(d)
    assert back == cfg and back.bnb_4bit_compute_dtype is torch.bfloat16
    assert LowbitConfig.from_dict(cfg.to_dict()).to_json_string() == cfg.to_json_string()


@pytest.mark.parametrize("kwargs,match", [
    ({"load_in_8bit": True, "load_in_4bit": True}, "both True"),
    ({}, "nothing to quantize"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "quant_type"),
    ({"load_in_4bit": True, "blocksize": 100}, "blocksize"),
    ({"load_in_8bit": True, "llm_int8_threshold": -1}, "threshold"),
    ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, "not supported"),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "float64"}, "unsupported dtype"),
    ({"load_in_4bit": True, "bnb_4bit_quant_storage": "int64"}, "quant_storage"),
    ({"bits": 3}, "bits must be 8 or 4"),
    ({"bits": 8, "load_in_4bit": True}, "contradicts"),
    ({"load_in_8bit": True, "llm_int8_skip_modules": "lm_head"}, "list of module names"),
    ({"load_in_8bit": True, "module_overrides": {"x": "int3"}}, "module_overrides"),
    ({"load_in_8bit": True, "module_overrides": {"(": "int8"}}, "regular expression"),
    ({"load_in_8bit": True, "lowbit_config_version": 99}, "newer lowbit"),
    ({"load_in_8bit": True, "typo_field": 1}, "unknown arguments"),
])  # fmt: skip
def test_invalid_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowbitConfig(**kwargs)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.blocks = nn.ModuleList(nn.ModuleDict({"up_proj": nn.Linear(64, 128), "down_proj": nn.Linear(128, 64)})
                                    for _ in range(2))  # fmt: skip
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.tied_head = nn.Linear(64, 50, bias=False)
        self.tied_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down_proj"](torch.relu(b["up_proj"](h)))
        return self.lm_head(h) + self.tied_head(h)


def test_quantize_model_swaps_linears_and_keeps_heads():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 7))
    expected = model(ids)
    cfg = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", module_overrides={"down_proj": "int8"})
    assert quantize_model(model, cfg) is model
    assert isinstance(model.blocks[0]["up_proj"], Linear4bit)
    assert isinstance(model.blocks[1]["down_proj"], Linear8bit)
    assert type(model.lm_head) is nn.Linear and type(model.tied_head) is nn.Linear
    assert model.tied_head.weight is model.embed.weight
    out = model(ids)
    assert (out - expected).norm() / expected.norm() < 0.05


def test_replace_linears_on_meta_allocates_nothing():
    with torch.device("meta"):
        model = TinyLM()
    names = lowbit.replace_linears(model, LowbitConfig(load_in_8bit=True), skip={"blocks.1.up_proj"})
    assert names == ["blocks.0.up_proj", "blocks.0.down_proj", "blocks.1.down_proj"]
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    layer = model.blocks[0]["up_proj"]
    layer.to_empty(device="cpu")
    layer.quantize_weight_(torch.randn(128, 64))
    assert layer.weight.device.type == "cpu"


def test_weight_only_int8_is_a_scheme():
    config = LowbitConfig(load_in_8bit=True, llm_int8_weight_only=True)
    assert config.scheme_for("model.layers.0.mlp.up_proj") == "int8-wo"
    assert LowbitConfig.from_dict(config.to_dict()) == config
    mixed = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", module_overrides={r"down_proj$": "int8-wo"})
    model = nn.Sequential()
    model.add_module("up_proj", nn.Linear(64, 64))
    model.add_module("down_proj", nn.Linear(64, 64))
    quantize_model(model, mixed)
    assert isinstance(model.up_proj, Linear4bit) and model.down_proj.weight_only
    with pytest.raises(ValueError, match="written by a newer lowbit"):
        LowbitConfig(load_in_8bit=True, lowbit_config_version=LowbitConfig.VERSION + 1)
