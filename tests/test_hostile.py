"""Hostile and corrupt inputs: every case must raise an exception of the stated type whose message names
the problem (the tensor or field, and the layer where there is one); none may return a number.

Grouped as the hardening issue numbers them: 1 scale metadata, 2 meta/mixed devices and fake kernels,
3 empty layers, 4 int8 accumulation bound, 5 linear_4bit's in_features, 6 from_pretrained messages,
7 JSON of the wrong type, 8 atomic quantize_model, 9 constructor and config checks, 10 configs that
transformers would route to bitsandbytes."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lowbit
from lowbit import Linear4bit, Linear8bit, LowbitConfig, ops
from lowbit.formats import MAX_INT8_K, dynamic_map

QS = "weight.quant_state.bitsandbytes__nf4"


def _linear(k=64, n=16):
    torch.manual_seed(k + n)
    return torch.nn.Linear(k, n)


def _sd4(double_quant=False, quant_type="nf4"):
    return Linear4bit.from_linear(_linear(), quant_type=quant_type, double_quant=double_quant).state_dict()


def _sd8():
    return Linear8bit.from_linear(_linear()).state_dict()


def _with_json(sd, **changes):
    """sd with its quant_state JSON changed: a value of ... removes the field."""
    key = next(k for k in sd if k.startswith("weight.quant_state."))
    meta = json.loads(bytes(sd[key].tolist()))
    for field, value in changes.items():
        meta.pop(field) if value is ... else meta.__setitem__(field, value)
    return {**sd, key: _json_bytes(json.dumps(meta))}


def _json_bytes(text):
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def _load(layer_class, sd, prefix="proj"):
    """Load sd into a fresh layer held by a parent module, so errors must name the layer ("proj")."""
    parent = torch.nn.Module()
    parent.proj = layer_class(64, 16)
    parent.load_state_dict({f"{prefix}.{k}": v for k, v in sd.items()})
    return parent.proj


# -- 1. scale metadata -----------------------------------------------------------------------------

NEGATIVE_ABSMAX = lambda sd: {**sd, "weight.absmax": -sd["weight.absmax"]}  # noqa: E731


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), float("-inf"), 1e39, -1e39])
def test_nested_offset_must_be_a_finite_float32(offset):
    with pytest.raises(ValueError, match=r"proj: .*nested_offset must be a finite float32"):
        _load(Linear4bit, _with_json(_sd4(double_quant=True), nested_offset=offset))


@pytest.mark.parametrize("edit, match", [
    (NEGATIVE_ABSMAX, r"proj: 'weight\.absmax' holds NaN, Inf or negative scales"),
    (lambda sd: {**sd, "weight.absmax": sd["weight.absmax"].index_fill(0, torch.tensor([3]), float("nan"))},
     r"proj: 'weight\.absmax' holds NaN"),
    (lambda sd: {**sd, "weight.absmax": sd["weight.absmax"].index_fill(0, torch.tensor([0]), float("inf"))},
     r"proj: 'weight\.absmax' holds NaN, Inf"),
    (lambda sd: {**sd, "weight.absmax": sd["weight.absmax"].half()}, r"proj: 'weight\.absmax' must be float32"),
])  # fmt: skip
def test_plain_scales_must_be_finite_and_non_negative(edit, match):
    with pytest.raises(ValueError, match=match):
        _load(Linear4bit, edit(_sd4()))


@pytest.mark.parametrize("edit, match", [
    (lambda sd: {**sd, "weight.nested_absmax": -sd["weight.nested_absmax"]}, r"nested_absmax' holds NaN, Inf or negative"),
    (lambda sd: {**sd, "weight.nested_absmax": sd["weight.nested_absmax"] * float("nan")}, r"nested_absmax' holds NaN"),
    (lambda sd: {**sd, "weight.nested_quant_map": sd["weight.nested_quant_map"] * 2}, r"nested_quant_map' holds values outside \[-1, 1\]"),
    (lambda sd: {**sd, "weight.nested_quant_map": sd["weight.nested_quant_map"][:255]}, r"nested_quant_map' must have 256 entries"),
    (lambda sd: {**_with_json(sd, nested_offset=3e38), "weight.nested_absmax": torch.full_like(sd["weight.nested_absmax"], 3e38)},
     r"double-quantized scales of 'weight' overflow float32"),
    (lambda sd: {**sd, "weight.absmax": sd["weight.absmax"].float()}, r"absmax' of a double-quantized weight must be uint8"),
    (lambda sd: {k: v for k, v in sd.items() if k != "weight.nested_quant_map"}, r"lacks 'weight\.nested_quant_map'"),
])  # fmt: skip
def test_double_quantized_scales_are_validated(edit, match):
    with pytest.raises(ValueError, match=r"proj: .*" + match):
        _load(Linear4bit, edit(_sd4(double_quant=True)))


@pytest.mark.parametrize("scb, match", [
    (-torch.ones(16), "negative row scales"),
    (torch.full((16,), float("nan")), "NaN"),
    (torch.full((16,), float("inf")), "Inf"),
])  # fmt: skip
def test_int8_row_scales_must_be_finite_and_non_negative(scb, match):
    with pytest.raises(ValueError, match=rf"proj: 'SCB' holds .*{match}"):
        _load(Linear8bit, {**_sd8(), "SCB": scb})


def test_float32_absmax_with_nested_tensors_is_refused():
    sd = _sd4()
    sd_dq = _sd4(double_quant=True)
    mixed = {**sd, "weight.nested_absmax": sd_dq["weight.nested_absmax"],
             "weight.nested_quant_map": sd_dq["weight.nested_quant_map"]}  # fmt: skip
    with pytest.raises(ValueError, match=r"proj: .*lacks nested_offset"):
        _load(Linear4bit, mixed)
    packed, absmax = ops.quantize_4bit(torch.randn(16, 64))
    with pytest.raises(ValueError, match="given with a float32 absmax"):
        torch.ops.lowbit.linear_4bit(torch.randn(2, 64), packed, absmax, 64, "nf4", [16, 64], None,
                                     torch.ones(1), dynamic_map(), 0.0, 256)  # fmt: skip


# -- 2. meta and mixed devices; fake kernels validate --------------------------------------------


def _on(device, t):
    return t.to(device)


MIXED_DEVICE_CALLS = {
    "int8_mm": lambda m: ops.int8_mm(torch.zeros(2, 8, dtype=torch.int8, device=m), torch.zeros(3, 8, dtype=torch.int8)),
    "quantize_4bit_search": lambda m: ops.quantize_4bit_search(torch.randn(4, 64, device=m), importance=torch.ones(64)),
    "dequantize_4bit": lambda m: ops.dequantize_4bit(torch.zeros(32, 1, dtype=torch.uint8, device=m), torch.ones(1), 64,
                                                     "nf4", (64,)),
    "quantize_blockwise": lambda m: ops.quantize_blockwise(torch.randn(300, device=m), dynamic_map()),
    "dequantize_blockwise": lambda m: ops.dequantize_blockwise(torch.zeros(300, dtype=torch.uint8, device=m),
                                                               torch.ones(2), dynamic_map()),
    "linear_4bit": lambda m: ops.linear_4bit(torch.randn(2, 64), *(_on(m, t) for t in ops.quantize_4bit(torch.randn(16, 64))),
                                             64, "nf4", (16, 64)),
    "int8_linear": lambda m: ops.int8_linear(torch.randn(2, 64, device=m), torch.zeros(16, 64, dtype=torch.int8),
                                             torch.ones(16)),
}  # fmt: skip


@pytest.mark.parametrize("op", sorted(MIXED_DEVICE_CALLS))
def test_tensors_on_meta_and_cpu_together_raise(op):
    with pytest.raises(ValueError, match=rf"lowbit\.{op}: .* is on (cpu|meta) but the input is on (meta|cpu)"):
        MIXED_DEVICE_CALLS[op]("meta")


META_BAD_CALLS = [
    (lambda d: ops.quantize_4bit(torch.randn(64, device=d), 0), ValueError, "blocksize must be a power of two"),
    (lambda d: ops.quantize_4bit(torch.randn(64, device=d), 64, "nf5"), ValueError, "quant_type must be 'nf4' or 'fp4'"),
    (lambda d: ops.quantize_4bit(torch.zeros(64, dtype=torch.int32, device=d)), TypeError, "float32, float16 or bfloat16"),
    (lambda d: ops.quantize_4bit_search(torch.randn(64, device=d), 64, "nf4", []), ValueError,
     "ratios must have 1 to 64 entries, got 0"),
    (lambda d: ops.quantize_4bit_search(torch.randn(64, device=d), 64, "nf4", [1.0, 0.0]), ValueError,
     r"every ratio must be in \(0, 4\], got 0"),
    (lambda d: ops.quantize_4bit_search(torch.randn(64, device=d), 64, "nf4", [float("nan")]), ValueError,
     "every ratio must be in"),
    (lambda d: ops.quantize_4bit_search(torch.randn(4, 64, device=d), 64, "nf4", importance=torch.ones(63, device=d)),
     ValueError, "importance has 63 entries but A's last dimension is 64"),
    (lambda d: ops.quantize_4bit_search(torch.randn(4, 64, device=d), 64, "nf4", importance=torch.ones(64, 1, device=d)),
     ValueError, "importance must be 1-D"),
    (lambda d: ops.quantize_4bit_search(torch.randn(4, 64, device=d), 64, "nf4",
                                        importance=torch.ones(64, dtype=torch.float64, device=d)),
     TypeError, "importance must be Float"),
    (lambda d: ops.quantize_4bit_search(torch.randn((), device=d), 64, "nf4", importance=torch.ones(1, device=d)),
     ValueError, r"A \(when importance is given\) must have at least one dimension"),
    (lambda d: ops.dequantize_4bit(torch.zeros(31, 1, dtype=torch.uint8, device=d), torch.ones(1, device=d), 64,
                                 "nf4", (64,)), ValueError, "packed has 31 elements, expected 32"),
    (lambda d: ops.dequantize_4bit(torch.zeros(32, 1, dtype=torch.uint8, device=d), torch.ones(2, device=d), 64,
                                 "nf4", (64,)), ValueError, "absmax has 2 elements, expected 1"),
    (lambda d: ops.dequantize_blockwise(torch.zeros(300, dtype=torch.uint8, device=d), torch.ones(1, device=d),
                                      dynamic_map(d)), ValueError, "absmax has 1 elements, expected 2"),
    (lambda d: ops.linear_4bit(torch.randn(2, 127, device=d), torch.zeros(64, 1, dtype=torch.uint8, device=d),
                             torch.ones(2, device=d), 64, "nf4", (1, 128)), ValueError,
     r"x has 127 features but the weight is \[1, 128\]"),
    (lambda d: ops.int8_mm(torch.zeros(1, MAX_INT8_K + 1, dtype=torch.int8, device=d),
                         torch.zeros(1, MAX_INT8_K + 1, dtype=torch.int8, device=d)), ValueError, "overflow"),
    (lambda d: ops.int8_vectorwise_quant(torch.zeros(2, 4, dtype=torch.int8, device=d)), TypeError, "A must be float32"),
    (lambda d: ops.int8_vectorwise_quant(torch.zeros(2, 4, device=d), -1.0), ValueError, "threshold must be finite"),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(META_BAD_CALLS)))
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_meta_calls_raise_what_cpu_calls_raise(case, device):
    # The Meta kernels run the CPU kernels' validators: the same exception and message on both.
    call, error, match = META_BAD_CALLS[case]
    with pytest.raises(error, match=match):
        call(device)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_scale_search_importance_must_be_finite_and_non_negative(bad):
    importance = torch.ones(64)
    importance[5] = bad
    with pytest.raises(ValueError, match="lowbit.quantize_4bit_search: importance must be finite and >= 0"):
        ops.quantize_4bit_search(torch.randn(4, 64), importance=importance)


def test_a_code_with_nan_is_not_sorted():
    code = torch.linspace(-1, 1, 256)
    code[100] = float("nan")
    with pytest.raises(ValueError, match=r"code must be sorted ascending \(entry 100\)"):
        ops.quantize_blockwise(torch.randn(512), code, 256)


@pytest.mark.parametrize("call", [
    lambda: ops.linear_4bit(torch.randn(1, 4), torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0), 64, "nf4",
                            (2**62, 4)),
    lambda: ops.dequantize_4bit(torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0), 64, "nf4", (2**32, 2**32)),
])  # fmt: skip
def test_shapes_whose_size_overflows_int64_are_refused(call):
    with pytest.raises(ValueError, match="more elements than an int64 counts"):
        call()


def test_torch_compile_reports_the_validators_error():
    compiled = torch.compile(lambda x: ops.quantize_4bit(x, 48), fullgraph=True)
    with pytest.raises(Exception, match=re.escape("lowbit.quantize_4bit: blocksize must be a power of two")):
        compiled(torch.randn(64))


# -- 3. a layer that holds no weight ----------------------------------------------------------------


@pytest.mark.parametrize("layer_class", [Linear4bit, Linear8bit])
def test_an_empty_layer_refuses_to_compute(layer_class):
    layer = layer_class(64, 8)
    with pytest.raises(RuntimeError, match=rf"{layer_class.__name__}\(64, 8\) holds no weight"):
        layer(torch.randn(2, 64))
    layer.load_state_dict(layer_class.from_linear(_linear(64, 8)).state_dict())
    assert layer(torch.randn(2, 64)).isfinite().all()


def test_an_empty_layer_on_meta_may_trace_shapes():
    assert Linear4bit(64, 8, device="meta")(torch.randn(2, 64, device="meta")).shape == (2, 8)


# -- 4. int8 accumulation --------------------------------------------------------------------------


def test_int8_mm_is_exact_for_the_whole_int8_range_at_the_largest_k():
    A = torch.full((1, MAX_INT8_K), -128, dtype=torch.int8)
    B = torch.full((2, MAX_INT8_K), -128, dtype=torch.int8)
    exact = MAX_INT8_K * 128 * 128
    assert exact < 2**31
    assert (ops.int8_mm(A, B) == exact).all() and (lowbit.reference.int8_mm(A, B) == exact).all()
    with pytest.raises(ValueError, match=rf"K = {MAX_INT8_K + 1} could overflow"):
        ops.int8_mm(torch.zeros(1, MAX_INT8_K + 1, dtype=torch.int8), torch.zeros(1, MAX_INT8_K + 1, dtype=torch.int8))


def test_int8_layers_refuse_in_features_beyond_the_bound():
    with pytest.raises(ValueError, match="in_features = 200000 is more than"):
        Linear8bit(200_000, 4)


# -- 5. linear_4bit knows the weight's in_features ---------------------------------------------------


def test_linear_4bit_tells_k_127_from_128():
    packed, absmax = ops.quantize_4bit(torch.randn(1, 128))
    assert packed.numel() == 64 and absmax.numel() == 2  # the same counts as a [1, 127] weight's
    with pytest.raises(ValueError, match=r"x has 127 features but the weight is \[1, 128\]"):
        ops.linear_4bit(torch.randn(3, 127), packed, absmax, 64, "nf4", (1, 128))


# -- 6 and 7. checkpoints through from_pretrained and state_dict --------------------------------------

LAYER = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def quantized_dirs(tiny_llama_factory, tmp_path_factory):
    """scheme -> a saved quantized tiny Llama."""
    saved = {}
    for scheme, config in {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                           "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
                           "int8": dict(load_in_8bit=True)}.items():  # fmt: skip
        path = tmp_path_factory.mktemp(scheme)
        AutoModelForCausalLM.from_pretrained(tiny_llama_factory(), quantization_config=LowbitConfig(**config)).save_pretrained(path)
        saved[scheme] = path
    return saved


@pytest.fixture
def corrupted(quantized_dirs, tmp_path):
    """`corrupted(scheme, edit_tensors, edit_config=None) -> path`: a copy of a saved checkpoint, edited."""

    def make(scheme, edit_tensors, edit_config=None):
        source = quantized_dirs[scheme]
        for f in source.iterdir():
            (tmp_path / f.name).write_bytes(f.read_bytes())
        tensors = load_file(source / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
        if edit_config:
            config = json.loads((tmp_path / "config.json").read_text())
            edit_config(config)
            (tmp_path / "config.json").write_text(json.dumps(config))
        return tmp_path

    return make


def _set(key, change):
    def edit(tensors):
        tensors[f"{LAYER}.{key}"] = change(tensors[f"{LAYER}.{key}"])

    return edit


def _json_edit(**changes):
    def edit(tensors):
        key = next(k for k in tensors if k.startswith(f"{LAYER}.weight.quant_state."))
        meta = json.loads(bytes(tensors[key].tolist()))
        meta.update(changes)
        tensors[key] = _json_bytes(json.dumps(meta))

    return edit


FROM_PRETRAINED_CASES = {
    "absmax one short": ("nf4", _set("weight.absmax", lambda t: t[:-1]), r"'weight\.absmax' has \d+ entries"),
    "NaN absmax": ("nf4", _set("weight.absmax", lambda t: t * float("nan")), r"absmax' holds NaN"),
    "negative absmax": ("nf4", _set("weight.absmax", lambda t: -t), r"absmax' holds NaN, Inf or negative"),
    "NaN SCB": ("int8", _set("SCB", lambda t: t * float("nan")), r"'SCB' holds NaN"),
    "negative SCB": ("int8", _set("SCB", lambda t: -t), r"'SCB' holds .*negative"),
    "bad JSON": ("nf4", _set(QS, lambda t: t[:-3]), r"not valid JSON"),
    "NaN nested_offset": ("nf4-dq", _json_edit(nested_offset=float("nan")), r"nested_offset must be a finite float32"),
    "weight_format 1": ("int8", _set("weight_format", lambda t: torch.ones_like(t)), r"weight_format 1 is not supported"),
    "wrong packed size": ("nf4", _set("weight", lambda t: t[:-5]), r"packed weight has \d+ bytes"),
}


@pytest.mark.parametrize("case", sorted(FROM_PRETRAINED_CASES))
def test_from_pretrained_raises_lowbits_message_naming_the_layer(corrupted, case):
    scheme, edit, match = FROM_PRETRAINED_CASES[case]
    with pytest.raises(ValueError, match=rf"{re.escape(LAYER)}: .*{match}"):
        AutoModelForCausalLM.from_pretrained(corrupted(scheme, edit))


def test_from_pretrained_of_a_config_edited_to_other_sizes(corrupted):
    def grow(config):
        config["intermediate_size"] = 192

    with pytest.raises(ValueError, match=rf"{re.escape(LAYER)}: the checkpoint's weight is \[128, 256\] but the "
                                         r"model's layer is \[128, 192\]"):  # fmt: skip
        AutoModelForCausalLM.from_pretrained(corrupted("nf4", lambda t: None, grow))


JSON_TYPE_CASES = [
    ("null", None, TypeError, r"must be a JSON object, got NoneType"),
    ("a number", 3, TypeError, r"must be a JSON object, got int"),
    ("blocksize list", dict(blocksize=[64]), TypeError, r"blocksize must be an integer, got list"),
    ("blocksize float", dict(blocksize=64.0), TypeError, r"blocksize must be an integer, got float"),
    ("shape string", dict(shape="40,96"), TypeError, r"shape must be a list of non-negative integers, got str"),
    ("shape negative", dict(shape=[-16, 64]), TypeError, r"shape must be a list of non-negative integers"),
    ("quant_type number", dict(quant_type=4), TypeError, r"quant_type must be a string, got int"),
    ("dtype float64", dict(dtype="float64"), ValueError, r"dtype: unsupported dtype 'float64'"),
    ("dtype missing", dict(dtype=...), ValueError, r"lacks \['dtype'\]"),
    ("blocksize 48", dict(blocksize=48), ValueError, r"blocksize: blocksize must be a power of two"),
]


@pytest.mark.parametrize("case", [c[0] for c in JSON_TYPE_CASES])
def test_quant_state_json_of_the_wrong_type_names_the_field(case):
    _, change, error, match = next(c for c in JSON_TYPE_CASES if c[0] == case)
    sd = _sd4()
    bad = {**sd, QS: _json_bytes(json.dumps(change))} if not isinstance(change, dict) else _with_json(sd, **change)
    with pytest.raises(error, match=rf"proj: .*{QS}.*{match}|proj: .*{match}"):
        _load(Linear4bit, bad)


@pytest.mark.parametrize("field, value, error, match", [
    ("nested_offset", "abc", TypeError, r"nested_offset must be a number, got str"),
    ("nested_offset", True, TypeError, r"nested_offset must be a number, got bool"),
    ("nested_blocksize", 0, ValueError, r"nested_blocksize: blocksize must be a power of two"),
    ("nested_blocksize", "256", TypeError, r"nested_blocksize must be an integer, got str"),
    ("nested_offset", ..., ValueError, r"lacks nested_offset"),
])  # fmt: skip
def test_nested_json_fields_are_checked(field, value, error, match):
    with pytest.raises(error, match=rf"proj: .*{match}"):
        _load(Linear4bit, _with_json(_sd4(double_quant=True), **{field: value}))


@pytest.mark.parametrize("value, error, match", [
    (torch.tensor([0, 0], dtype=torch.uint8), ValueError, r"'weight_format' must be one integer, got .* shape \[2\]"),
    (torch.tensor(0.0), ValueError, r"'weight_format' must be one integer, got a torch.float32"),
    ("row", TypeError, r"'weight_format' must be an integer, got str"),
])  # fmt: skip
def test_weight_format_of_the_wrong_type(value, error, match):
    with pytest.raises(error, match=rf"proj: {match}"):
        _load(Linear8bit, {**_sd8(), "weight_format": value})


def test_quant_state_bytes_of_the_wrong_dtype():
    sd = _sd4()
    with pytest.raises(TypeError, match=rf"proj: '{QS}' must be uint8"):
        _load(Linear4bit, {**sd, QS: sd[QS].float()})


def test_strict_loading_refuses_unknown_keys():
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*proj\.weight\.foo"):
        _load(Linear4bit, {**_sd4(), "weight.foo": torch.zeros(1)})


# -- 8. quantize_model is all or nothing -------------------------------------------------------------


@pytest.mark.parametrize("config", [LowbitConfig(load_in_8bit=True), LowbitConfig(load_in_4bit=True)])
def test_quantize_model_names_the_module_and_leaves_the_model_unchanged(config):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight[3, 5] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"module '2': .*NaN.* \(the model was left unchanged\)"):
        lowbit.quantize_model(model, config)
    assert all(type(m) is torch.nn.Linear for m in (model[0], model[2]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if not v.isnan().any())


# -- 9. constructor and config checks ----------------------------------------------------------------


@pytest.mark.parametrize("make, error, match", [
    (lambda: Linear4bit(64, 8, compute_dtype=torch.int8), ValueError, "unsupported dtype 'int8'"),
    (lambda: Linear4bit(64, 8, compute_dtype=torch.float64), ValueError, "unsupported dtype 'float64'"),
    (lambda: Linear4bit(64, 8, compute_dtype="half"), ValueError, "unsupported dtype 'half'"),
    (lambda: Linear4bit(64, 8, quant_storage="uint9"), ValueError, "quant_storage must be one of"),
    (lambda: Linear4bit(64, 8, quant_storage=torch.int32), ValueError, "quant_storage must be one of"),
    (lambda: Linear4bit(64, 8, dtype=torch.int32), TypeError, r"dtype \(of the weight before quantization\) must be float32"),
    (lambda: Linear4bit(64.0, 8), ValueError, "in_features must be an int >= 0, got 64.0"),
    (lambda: Linear4bit(64, -1), ValueError, "out_features must be an int >= 0, got -1"),
    (lambda: Linear8bit(64, 8, threshold="6.0"), TypeError, "threshold must be a number, got str"),
    (lambda: Linear8bit(64, 8, threshold=float("nan")), ValueError, "threshold must be finite and >= 0"),
    (lambda: Linear8bit.from_linear(_int32_linear()), TypeError, "the weight of the nn.Linear to quantize must be float32"),
    (lambda: LowbitConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float64), ValueError,
     "bnb_4bit_compute_dtype: unsupported dtype 'float64'"),
    (lambda: LowbitConfig(load_in_4bit=True, bnb_4bit_compute_dtype=3), TypeError, "bnb_4bit_compute_dtype: dtype must be"),
    (lambda: LowbitConfig(load_in_4bit=True, bnb_4bit_quant_storage="uint9"), ValueError, "bnb_4bit_quant_storage:"),
    (lambda: LowbitConfig(load_in_8bit=True, llm_int8_threshold="6"), TypeError, "llm_int8_threshold must be a number"),
    (lambda: LowbitConfig(load_in_8bit=True, module_overrides={1: "int8"}), TypeError, "module_overrides maps regular"),
    (lambda: LowbitConfig(load_in_8bit=True, module_overrides="down_proj"), TypeError, "module_overrides must be a dict"),
    (lambda: LowbitConfig(load_in_4bit=True, blocksize="64"), TypeError, "blocksize: blocksize must be an int"),
    (lambda: LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf5"), ValueError, "bnb_4bit_quant_type: quant_type"),
])  # fmt: skip
def test_constructor_and_config_checks_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _int32_linear():
    linear = torch.nn.Linear(8, 4)
    linear.weight = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.int32), requires_grad=False)
    return linear


# -- 10. a "lowbit" config that transformers would hand to bitsandbytes ----------------------------------


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_lowbit_config_with_a_truthy_load_in_flag_is_refused(corrupted, flag):
    def route_to_bitsandbytes(config):
        config["quantization_config"][flag] = True

    with pytest.raises(ValueError, match=rf"quant_method 'lowbit' but also {flag}=True.*bitsandbytes"):
        AutoModelForCausalLM.from_pretrained(corrupted("nf4", lambda t: None, route_to_bitsandbytes))


# ---- round 2 (hardening issue #19) ----------------------------------------------------------------------------


def test_module_overrides_keep_their_order_through_config_json(tiny_llama_dir, tmp_path):
    # "mlp" comes first, so down_proj is LLM.int8(); sorted keys would put "down_proj" first (int8-wo).
    overrides = {r"mlp": "int8", r"down_proj": "int8-wo"}
    config = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", module_overrides=overrides)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    assert not model.model.layers[0].mlp.down_proj.weight_only
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["module_overrides"]
    assert saved == [["mlp", "int8"], ["down_proj", "int8-wo"]]
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not again.model.layers[0].mlp.down_proj.weight_only
    assert again.config.quantization_config == config
    # Order is part of the config: the same pairs in another order are another config.
    assert config != LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", module_overrides=dict(reversed(overrides.items())))
    # The dict form older lowbit wrote still loads, in its (sorted) order.
    assert LowbitConfig.from_dict({"bits": 4, "module_overrides": {"a": "int8"}}).module_overrides == {"a": "int8"}


@pytest.mark.parametrize("field", ["load_in_8bit", "load_in_4bit", "bnb_4bit_use_double_quant", "llm_int8_weight_only",
                                   "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight"])  # fmt: skip
@pytest.mark.parametrize("value", ["false", "True", 1, None])
def test_flags_take_only_booleans(field, value):
    kwargs = {"load_in_4bit": True, field: value} if field != "load_in_4bit" else {"load_in_8bit": False, field: value}
    with pytest.raises(TypeError, match=f"{field} must be True or False"):
        LowbitConfig(**kwargs)


@pytest.mark.parametrize("version", [-1, 0, "3", 2.5, True])
def test_config_version_must_be_a_positive_integer(version):
    with pytest.raises(ValueError, match="lowbit_config_version must be a positive integer"):
        LowbitConfig.from_dict({"bits": 4, "lowbit_config_version": version})


def test_update_validates_like_the_constructor():
    config = LowbitConfig(load_in_4bit=True)
    with pytest.raises(ValueError, match="blocksize"):
        config.update(blocksize=7)
    assert config.blocksize == 64  # unchanged by the refused update
    assert config.update(blocksize=128, not_a_field=1) == {"not_a_field": 1} and config.blocksize == 128
    config.update(load_in_8bit=True, load_in_4bit=False)
    assert config.bits == 8
    with pytest.raises(TypeError, match="must be True or False"):
        config.update(load_in_8bit="yes")


@pytest.mark.parametrize("overrides, error", [
    ([("a", "int8"), ("a", "nf4")], "names a pattern twice"),
    ([("a", "int8", "x")], "a dict"),
    ("down_proj", "a dict"),
    ({1: "int8"}, "regular expressions"),
])  # fmt: skip
def test_bad_module_overrides_are_named(overrides, error):
    with pytest.raises((TypeError, ValueError), match=error):
        LowbitConfig(load_in_4bit=True, module_overrides=overrides)


CLI_SMALL = ["--tokens", "120", "--context", "64", "--stride", "32", "--new-tokens", "3", "--no-progress"]


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "-5"], "max_tokens must be an integer ≥ 2"),
    (["--new-tokens", "0"], "new_tokens must be an integer ≥ 1"),
    (["--new-tokens", "-1"], "new_tokens must be an integer ≥ 1"),
    (["--stride", "100"], "stride (100) must not exceed context (64)"),
    (["--max-ppl-increase", "nan%"], "max_ppl_increase must be a finite fraction"),
    (["--max-ppl-increase=-1%"], "max_ppl_increase must be a finite fraction"),
    (["--device", "foo"], "device 'foo' is not a torch device"),
    (["--device", "cuda:7"], "CUDA device(s)"),
])  # fmt: skip
def test_cli_numbers_and_devices_are_checked_before_any_work(tiny_llama_dir, capsys, monkeypatch, argv, message):
    from lowbit.cli import main

    loads = []
    monkeypatch.setattr("lowbit.compare.api.load_full_precision", lambda *a, **k: loads.append(a))
    assert main(["compare", str(tiny_llama_dir), *CLI_SMALL, *argv]) == 2
    assert message in capsys.readouterr().err and not loads


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50) and ["--text", str(d / "latin1.txt")],
     "is not UTF-8 text"),
    (lambda d: (d / "a-file").write_text("x") and ["--out", str(d / "a-file")], "is a file: give a directory"),
])  # fmt: skip
def test_cli_files_are_checked_before_any_work(tiny_llama_dir, tmp_path, capsys, monkeypatch, make, message):
    from lowbit.cli import main

    monkeypatch.setattr("lowbit.compare.api.load_full_precision", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exit:
        main(["compare", str(tiny_llama_dir), *CLI_SMALL, *make(tmp_path)])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_loaded_model_pickles_and_deep_copies(tiny_llama_dir, tmp_path):
    import copy

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=LowbitConfig(load_in_4bit=True))
    torch.save(model, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    twin = copy.deepcopy(model)
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits) and torch.equal(twin(ids).logits, model(ids).logits)
    # The count still includes lowbit's quantized weights (buffers), on every copy.
    assert again.num_parameters() == twin.num_parameters() == model.num_parameters() > sum(p.numel() for p in model.parameters())


def test_export_refuses_unmerged_adapters_and_a_file(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=LowbitConfig(load_in_8bit=True))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        lowbit.export_bitsandbytes(model, tmp_path / "a-file")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"merge_and_unload\(\)"):
        lowbit.export_bitsandbytes(peft_model, tmp_path / "out")
    with pytest.raises(ValueError, match=r"unmerged LoRA.*merge_and_unload\(\)"):
        lowbit.export_bitsandbytes(peft_model.base_model.model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config_kwargs, lm_head_quantized", [
    (dict(load_in_4bit=True), False),  # default skip list: lm_head stays full
    (dict(load_in_4bit=True, llm_int8_skip_modules=[]), True),
    (dict(load_in_8bit=True, module_overrides={"lm_head": "nf4"}), True),
])  # fmt: skip
def test_from_pretrained_and_quantize_model_follow_one_rule(tiny_llama_dir, tmp_path, config_kwargs, lm_head_quantized):
    config = LowbitConfig(**config_kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    swapped = lowbit.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    kinds = [{n: type(m).__name__ for n, m in model.named_modules()} for model in (loaded, swapped)]
    assert kinds[0] == kinds[1]
    assert isinstance(loaded.lm_head, (Linear4bit, Linear8bit)) == lm_head_quantized
    # The README's round trip: quantize_model, save_pretrained, from_pretrained.
    swapped.config.quantization_config = config
    swapped.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, swapped(ids).logits)


def test_a_config_that_matches_nothing_raises_on_both_paths(tiny_llama_dir):
    config = LowbitConfig(load_in_4bit=True, module_overrides={".*": "none"})
    with pytest.raises(ValueError, match="the config quantizes no layer"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    with pytest.raises(ValueError, match="the config quantizes no layer"):
        lowbit.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    with pytest.raises(TypeError, match="skip must be a collection"):
        lowbit.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), LowbitConfig(load_in_4bit=True), skip="0")


def test_compare_names_configs_apart_or_refuses():
    from lowbit.compare.presets import describe, resolve

    b64, b128 = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), LowbitConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", blocksize=128)
    assert list(resolve([b64, b128])) == ["nf4", "nf4-b128"]
    assert describe(LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16")) == "nf4-bfloat16"
    with pytest.raises(ValueError, match="the same config listed twice"):
        resolve("nf4,nf4")
    with pytest.raises(ValueError, match="the same config listed twice"):
        resolve(["nf4", b64])
    storage = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage="bfloat16")
    with pytest.raises(ValueError, match=r"pass a dict \{name: config\}"):
        resolve([b64, storage])


@pytest.mark.parametrize("make", [lambda: Linear4bit.from_linear(_linear()), lambda: Linear8bit.from_linear(_linear())])
def test_a_layer_emptied_through_meta_refuses_to_compute(make):
    layer = make().to("meta").to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="holds no weight"):
        layer(torch.randn(2, 64))


@pytest.mark.parametrize("make", [lambda: Linear4bit.from_linear(_linear()), lambda: Linear8bit.from_linear(_linear()),
                                  lambda: Linear8bit.from_linear(_linear(), weight_only=True)])  # fmt: skip
def test_torch_func_transforms_are_refused_by_name_or_work(make):
    layer, x = make(), torch.randn(2, 64)
    with pytest.raises(NotImplementedError, match=r"does not support torch.func.jvp"):
        torch.func.jvp(layer, (x,), (torch.randn_like(x),))  # once a silent zero tangent
    with pytest.raises(NotImplementedError, match=r"does not support torch.func.grad"):
        torch.func.grad(lambda x: layer(x).sum())(x)
    assert torch.allclose(torch.func.vmap(layer)(x[:, None]).squeeze(1), layer(x), atol=1e-6)


@pytest.mark.parametrize("calibration, error, message", [
    (torch.tensor([[5, 300]]), ValueError, r"must lie in \[0, 258\)"),
    (torch.tensor([[-1, 3]]), ValueError, r"must lie in \[0, 258\)"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "at least one token"),
    (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"shape \[1, 2, 3\]"),
    (torch.tensor(5), ValueError, r"shape \[\]"),
    (torch.rand(1, 8), TypeError, "must be integers"),
    (torch.ones(1, 8, dtype=torch.bool), TypeError, "must be integers"),
    ([{"ids": torch.tensor([[1, 2]])}], ValueError, "needs 'input_ids'"),
])  # fmt: skip
def test_calibration_input_is_checked_at_the_door(tiny_llama_dir, calibration, error, message):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", scale_search="activation")
    with pytest.raises(error, match=f"calibration .*{message}|{message}"):
        lowbit.quantize_model(model, config, calibration=calibration)


def test_calibration_without_an_activation_search_is_refused(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", scale_search="mse")
    with pytest.raises(ValueError, match='calibration= is used only by scale_search="activation"'):
        lowbit.quantize_model(model, config, calibration=torch.tensor([[1, 2, 3]]))


def test_transformers_bitsandbytes_configs_and_dicts_are_accepted():
    from transformers import BitsAndBytesConfig as HfBnb

    hf = HfBnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    ours = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype="float32")  # fmt: skip
    assert LowbitConfig.from_dict(hf.to_dict()) == ours
    for given in (hf, hf.to_dict(), ours.to_dict()):
        model = lowbit.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), given)
        assert isinstance(model[0], Linear4bit) and model[0].double_quant
    with pytest.raises(TypeError, match="expected a lowbit.LowbitConfig"):
        lowbit.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), "nf4")


@pytest.mark.parametrize("layer, state, message", [
    (lambda: Linear4bit(64, 16, bias=True), lambda: _linear().state_dict(), "full-precision .nn.Linear. state dict"),
    (lambda: Linear4bit(64, 16, bias=True), _sd8, "an 8-bit .Linear8bit. state dict"),
    (lambda: Linear8bit(64, 16, bias=True), lambda: _linear().state_dict(), "full-precision .nn.Linear. state dict"),
    (lambda: Linear8bit(64, 16, bias=True), _sd4, "a 4-bit .Linear4bit. state dict"),
])  # fmt: skip
def test_a_state_dict_of_another_kind_is_named(layer, state, message):
    with pytest.raises(ValueError, match=message):
        layer().load_state_dict(state())


@pytest.mark.parametrize("rows", [5, 7, 9, 64])
def test_llm_int8_with_outliers_does_not_depend_on_the_thread_count(rows):
    torch.manual_seed(rows)
    layer = Linear8bit.from_linear(torch.nn.Linear(256, 384))
    x = torch.randn(rows, 256)
    x[:, [3, 77, 200]] *= 20  # outlier columns
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(layer(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_layers_follow_autocast_like_nn_linear():
    linear = _linear()
    for layer in (Linear4bit.from_linear(linear), Linear8bit.from_linear(linear), Linear8bit.from_linear(linear, weight_only=True)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(torch.randn(2, 64)).dtype == linear(torch.randn(2, 64)).dtype == torch.bfloat16


def test_the_scale_search_does_not_depend_on_the_scale_of_importance():
    linear = torch.nn.Linear(128, 16)
    importance = torch.rand(128) + 0.1
    layers = [Linear4bit.from_linear(linear, importance * scale, scale_search=True) for scale in (1.0, 2.0**120, 2.0**-100)]
    assert all(torch.equal(layers[0].weight, l.weight) and torch.equal(layers[0].absmax, l.absmax) for l in layers)
    # 1e37 is no power of two (each importance rounds once more), but nothing overflows: the same search, give or
    # take a near-tie.
    near = Linear4bit.from_linear(linear, importance * 1e37, scale_search=True)
    assert torch.allclose(near.absmax, layers[0].absmax, rtol=1e-4) and (near.weight == layers[0].weight).float().mean() > 0.99


def test_llm_int8_keeps_its_accuracy_on_subnormal_activations():
    from lowbit import reference

    torch.manual_seed(0)
    layer = Linear8bit.from_linear(torch.nn.Linear(256, 64, bias=False), threshold=0.0)
    x = torch.randn(4, 256) * 1e-39  # every row's absmax subnormal
    exact = x.double() @ layer.dequantize().double().t()
    for out in (layer(x), reference.int8_linear(x, layer.weight, layer.SCB, 0.0)):
        assert ((out.double() - exact).norm() / exact.norm()) < 0.02  # it was 3.5% in lowbit, 0.75% in the reference
