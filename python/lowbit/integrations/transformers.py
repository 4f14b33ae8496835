"""Hugging Face transformers integration: the "lowbit" quantization method.

`import lowbit` calls `register()`. After that:

* `from_pretrained(path, quantization_config=lowbit.LowbitConfig(...))` (or lowbit's `BitsAndBytesConfig`)
  builds the model on the meta device, swaps its `nn.Linear` layers for empty lowbit layers, and quantizes
  each weight as it is read, so the full-precision model never exists in memory at once;
* `save_pretrained` writes the layers' bitsandbytes-layout tensors plus a config with quant_method "lowbit",
  which `from_pretrained(path)` loads back as is;
* a checkpoint written by transformers + bitsandbytes loads into lowbit layers, without bitsandbytes, with
  `from_pretrained(path, config=bnb_checkpoint_config(path))`.
"""

from __future__ import annotations

import inspect
import os
from collections import defaultdict
from collections.abc import Iterable, MutableSet
from contextlib import contextmanager

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers import BitsAndBytesConfig as _TransformersBnbConfig
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers import auto as _auto

from ..config import LowbitConfig
from ..formats import QUANT_STATE_GROUP
from ..fsdp import prepare_fsdp
from ..nn import quantized_state_parameters, quantized_weight_count
from ..quantize import kept_in_full_precision, replace_linears
from ..schemes import LAYERS

QUANT_METHOD = "lowbit"

# Every name a quantized layer's tensors are saved under, relative to the layer (bitsandbytes' layout).
_QUANT_KEYS = tuple(dict.fromkeys(k for layer in LAYERS for k in layer.checkpoint_keys))
_SERIALIZED_KEYS = ("weight", *_QUANT_KEYS)


def register() -> None:
    """Make "lowbit" a quantization method transformers knows; safe to call any number of times."""
    _register_once(_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, _auto.register_quantization_config, LowbitConfig)
    _register_once(_auto.AUTO_QUANTIZER_MAPPING, _auto.register_quantizer, LowbitHfQuantizer)
    _refuse_lowbit_configs_routed_to_bitsandbytes()


def _refuse_lowbit_configs_routed_to_bitsandbytes() -> None:
    """transformers sends any quantization_config with a truthy load_in_4bit/load_in_8bit to bitsandbytes,
    whatever its quant_method. lowbit never writes those keys, so a "lowbit" config that has one was edited
    by hand or by another tool; loading it with bitsandbytes would give other numbers without a word. Every
    config dict transformers reads passes through AutoQuantizationConfig.from_dict: refuse it there."""
    current = _auto.AutoQuantizationConfig.__dict__["from_dict"].__func__
    if getattr(current, "_lowbit_guard", False):
        return

    def from_dict(cls, quantization_config_dict: dict):
        routed = [k for k in ("load_in_4bit", "load_in_8bit") if quantization_config_dict.get(k)]
        if quantization_config_dict.get("quant_method") == QUANT_METHOD and routed:
            raise ValueError(
                f"this quantization_config says quant_method {QUANT_METHOD!r} but also {routed[0]}=True, which makes "
                "transformers load it with bitsandbytes instead of lowbit (other numbers). lowbit writes `bits` "
                f"instead: replace {routed[0]} with \"bits\": {4 if routed[0] == 'load_in_4bit' else 8} in config.json"
            )
        return current(cls, quantization_config_dict)

    from_dict._lowbit_guard = True
    _auto.AutoQuantizationConfig.from_dict = classmethod(from_dict)


def _register_once(mapping: dict, register_fn, cls: type) -> None:
    current = mapping.get(QUANT_METHOD)
    if current is None:
        register_fn(QUANT_METHOD)(cls)
    elif (current.__module__, current.__qualname__) == (cls.__module__, cls.__qualname__):
        # Registered by an earlier import of this module (importlib.reload makes new class objects):
        # point transformers at the current class so isinstance checks agree with what users import.
        mapping[QUANT_METHOD] = cls
    else:
        raise RuntimeError(
            f"quantization method {QUANT_METHOD!r} is already registered with transformers by "
            f"{current.__module__}.{current.__qualname__}; lowbit cannot register its {cls.__name__}"
        )


class LowbitHfQuantizer(HfQuantizer):
    """Loads models into lowbit's Linear8bit / Linear4bit layers (see the module docstring)."""

    requires_calibration = False

    # Every name a quantized weight is saved under. `get_weight_conversions` turns this into one converter
    # that gathers a layer's tensors (4-bit or 8-bit alike) so `_LoadQuantized` can fill the layer at once.
    serialized_names = {"weight": list(_SERIALIZED_KEYS)}

    def validate_environment(self, device_map=None, **kwargs):
        # Disk offload would save each layer's tensors through transformers' per-parameter path,
        # which cannot rebuild a lowbit layer; everything else (cpu, accelerators, mixes) works.
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "lowbit layers cannot be offloaded to disk: the device_map places "
                f"{sorted(k for k, v in device_map.items() if v == 'disk')} on 'disk'"
            )
        if launched_for_fsdp2() and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("1", "true"):
            # accelerate would move the sharded model to meta and refill it from rank 0's state dict by position,
            # which needs every rank's state dict to list the same keys in the same order as a loaded one.
            raise ValueError(
                "lowbit does not support FSDP's cpu_ram_efficient_loading (accelerate skips it for bitsandbytes "
                "models too): set fsdp_cpu_ram_efficient_loading: false in the accelerate config (each rank then "
                "loads and quantizes the checkpoint; FSDP2 shards the quantized state when it wraps the model)"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized and self.quantization_config.quantizer == "gptq":
            raise ValueError(
                'quantizer="gptq" needs the full-precision model run on calibration data, which loading cannot do: '
                "load in full precision, then lowbit.quantize_model(model, config, calibration=ids) (and save_pretrained "
                "to keep the result: it loads anywhere bitsandbytes checkpoints do)"
            )
        if not self.pre_quantized and self.quantization_config.scale_search == "activation":
            raise ValueError(
                'scale_search="activation" needs the full-precision model run on calibration data, which loading '
                "cannot do: load in full precision, then lowbit.quantize_model(model, config, calibration=ids) (and "
                'save_pretrained to keep the result), or use scale_search="mse", which needs no data'
            )
        # The model is still on the meta device here: this only swaps modules, nothing is allocated. The modules
        # kept in full precision follow quantize_model's rule (one rule for both: kept_in_full_precision).
        self.modules_to_not_convert = sorted(kept_in_full_precision(model))
        replace_linears(model, self.quantization_config)
        if self.pre_quantized:
            _check_checkpoint_layout(model, checkpoint_files)

    def _process_model_after_weight_loading(self, model, **kwargs):
        errors = {name: m.__dict__.pop(_LOAD_ERROR) for name, m in model.named_modules() if _LOAD_ERROR in m.__dict__}
        if errors:
            # Raised here rather than where each layer failed: transformers turns errors raised while
            # loading into one generic RuntimeError and leaves the details in a log.
            raise ValueError(
                f"lowbit could not load {len(errors)} layer(s) from the checkpoint:\n  "
                + "\n  ".join(f"{name}: {message}" for name, message in errors.items())
            )
        # Flags scripts written for bitsandbytes look at (e.g. peft's prepare_model_for_kbit_training).
        bits = {m.bits for m in model.modules() if isinstance(m, LAYERS)}
        model.is_loaded_in_8bit = 8 in bits
        model.is_loaded_in_4bit = 4 in bits
        _count_lowbit_weights_in_num_parameters(type(model))
        if launched_for_fsdp2():
            prepare_fsdp(model)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name == "weight" and isinstance(model.get_submodule(module_name), LAYERS)

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def get_load_operations(self):
        return {"deserialize": _LoadQuantized}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        # Adapters (peft) train on top of frozen lowbit layers.
        return True

    def _dequantize(self, model, dtype=None):
        for name, module in list(model.named_modules()):
            if isinstance(module, LAYERS):
                weight = module.dequantize()
                linear = nn.Linear(
                    module.in_features,
                    module.out_features,
                    bias=module.bias is not None,
                    device=weight.device,
                    dtype=dtype or weight.dtype,
                )
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
                model.set_submodule(name, linear)
        return model


def launched_for_fsdp2() -> bool:
    """Whether this process was started by `accelerate launch` with an FSDP2 config (it sets these variables): a
    model loaded there is prepared for FSDP2 (lowbit.fsdp) as it loads, so the quantized state is sharded when
    accelerate calls fully_shard. Other launchers (torchrun with the Trainer's `fsdp` arguments, or a script
    calling fully_shard) call lowbit.prepare_fsdp(model) themselves."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
            and os.environ.get("FSDP_VERSION") == "2")  # fmt: skip


def _count_lowbit_weights_in_num_parameters(model_class: type) -> None:
    """transformers' own `num_parameters` imports bitsandbytes for any model flagged 4-bit (the Trainer calls it
    every step), and would miss lowbit's weights, which are buffers: where the model holds lowbit layers, count
    them with `_num_parameters`. Patched once on the class that defines the method (PreTrainedModel), not on the
    instance: a per-instance bound method broke pickling and deepcopy of loaded models."""
    owner = next(c for c in model_class.__mro__ if "num_parameters" in c.__dict__)
    current = owner.__dict__["num_parameters"]
    if getattr(current, "_lowbit", False):
        return

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        if any(isinstance(m, LAYERS) for m in self.modules()):
            return _num_parameters(self, only_trainable, exclude_embeddings)
        return current(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)

    num_parameters._lowbit = True
    num_parameters.__doc__ = current.__doc__
    owner.num_parameters = num_parameters


def _num_parameters(model, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """`PreTrainedModel.num_parameters` counting each lowbit layer's quantized weight as the values it stores."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
    left_out = embeddings | {id(p) for p in quantized_state_parameters(model)}  # prepared for FSDP: counted below
    counted = [p for p in model.parameters() if (p.requires_grad or not only_trainable) and id(p) not in left_out]
    return sum(p.numel() for p in counted) + (0 if only_trainable else quantized_weight_count(model))


class _QuantizeOnLoad(ConversionOps):
    """Quantizes a full-precision weight the moment transformers has read it.

    The layer's buffers are filled in place on the weight's device, so nothing is handed back to
    transformers; the layer's names come off the missing-key list here instead.
    """

    def __init__(self, hf_quantizer):
        # transformers recognizes loading ops by this attribute
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
        for key, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            module_name = key.rpartition(".")[0]
            module = model.get_submodule(module_name)
            with _recording_errors(module):
                module.quantize_weight_(weight)
            _mark_loaded(module, module_name, missing_keys)
        return {}


class _LoadQuantized(ConversionOps):
    """Fills a lowbit layer from the tensors a quantized checkpoint holds for it.

    The converter built from `serialized_names` matches every `*.weight` key, so full-precision weights
    (norms, embeddings, layers kept in full precision) come through here too and are passed on unchanged.
    """

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        tensors = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
        module_name = full_layer_name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        problem = _layout_problem(module, tensors)
        if problem:
            raise ValueError(f"{module_name}: {problem}")  # caught before loading (_check_checkpoint_layout)
        if not isinstance(module, LAYERS):
            # transformers skips its usual cast for tensors routed to a loading op: cast like it would,
            # to the dtype the model was built with.
            weight = tensors["weight"]
            expected = model.get_parameter_or_buffer(full_layer_name)
            if weight.is_floating_point() and expected.is_floating_point():
                weight = weight.to(expected.dtype)
            return {"weight": weight}
        with _recording_errors(module):
            module.load_quantized_(tensors)
        _mark_loaded(module, module_name, missing_keys)
        return {}

    @property
    def reverse_op(self) -> ConversionOps:
        # A lowbit layer's state_dict already uses the checkpoint names, so saving renames nothing.
        return _SaveAsIs()


class _SaveAsIs(ConversionOps):
    def convert(self, input_dict, **kwargs):
        return input_dict


# Where a layer keeps the error that stopped it from loading, until the quantizer raises it.
_LOAD_ERROR = "_lowbit_load_error"


@contextmanager
def _recording_errors(module: nn.Module):
    """Keeps a layer's loading error on the layer for the quantizer to raise once loading is over (see
    `_process_model_after_weight_loading`; transformers hands each converter its own copy of the
    quantizer, so the layer is the one place they share). The layer stays empty and refuses to compute."""
    try:
        yield
    except (TypeError, ValueError, RuntimeError) as e:
        module.__dict__[_LOAD_ERROR] = str(e)


def _mark_loaded(module: nn.Module, module_name: str, missing_keys: MutableSet[str] | None) -> None:
    # Stop transformers from re-initializing the layer or materializing its (never assigned) names.
    module._is_hf_initialized = True
    if missing_keys is not None:
        for key in _SERIALIZED_KEYS:
            missing_keys.discard(f"{module_name}.{key}")


def _layout_problem(module: nn.Module, keys: Iterable[str]) -> str | None:
    """What is wrong with the checkpoint tensors `keys` (relative to the layer) for `module`, or None."""
    keys = set(keys)
    quantized = keys & set(_QUANT_KEYS)
    if not isinstance(module, LAYERS):
        if quantized:
            return (
                f"the checkpoint holds quantized tensors {sorted(quantized)} but the quantization "
                "config keeps this module in full precision (lm_head, tied weights, llm_int8_skip_modules "
                "or module_overrides differ from the ones the checkpoint was saved with)"
            )
        return None
    if "weight" not in keys:
        return f"the checkpoint has no packed `weight` for this quantized layer (found {sorted(keys)})"
    foreign = quantized - set(module.checkpoint_keys)
    if foreign:
        theirs = next(layer for layer in LAYERS if foreign & set(layer.checkpoint_keys))
        return (f"the config quantizes this layer to {module.bits}-bit but the checkpoint holds "
                f"{theirs.bits}-bit tensors {sorted(foreign)}")  # fmt: skip
    return module.layout_problem(keys)


def _check_checkpoint_layout(model, checkpoint_files: list[str] | None) -> None:
    """Fail before anything loads, naming every layer whose checkpoint tensors do not fit it.

    Reads safetensors headers (names and shapes) and the small quant_state JSON tensors: which tensors each
    layer has, and whether the weight they declare has the layer's shape (a config.json edited to other
    sizes). The values are validated per layer while loading (see `_recording_errors`).
    """
    if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return
    by_module: dict[str, dict[str, object]] = defaultdict(dict)
    for file in checkpoint_files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                module_name, suffix = _split_serialized_key(key)
                if suffix is not None:
                    quant_state = suffix.startswith(f"weight.{QUANT_STATE_GROUP}")
                    by_module[module_name][suffix] = f.get_tensor(key) if quant_state else f.get_slice(key).get_shape()
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    problems = []
    for name, module in model.named_modules():
        # The checkpoint may hold the base model alone, or the model with a head (transformers adds or
        # strips the base model prefix when loading), so look under all three spellings.
        owner = next((n for n in (name, name.removeprefix(prefix), prefix + name) if n in by_module), name)
        entries = by_module.get(owner, {})
        problem = _layout_problem(module, entries) or _shape_problem(module, entries)
        if problem:
            problems.append(f"{name}: {problem}")
    if problems:
        raise ValueError(
            f"the quantized checkpoint in {os.path.dirname(checkpoint_files[0])} does not fit the model:\n  "
            + "\n  ".join(problems)
        )


def _shape_problem(module: nn.Module, entries: dict[str, object]) -> str | None:
    """Whether the weight a lowbit layer's checkpoint entries declare has the layer's shape, or None."""
    if not isinstance(module, LAYERS):
        return None
    try:
        declared = module.declared_weight_shape(entries)
    except (TypeError, ValueError) as e:
        return str(e)
    expected = (module.out_features, module.in_features)
    if declared != expected:
        return (f"the checkpoint's weight is {list(declared)} but the model's layer is {list(expected)} "
                "(does config.json match the checkpoint?)")  # fmt: skip
    return None


def _split_serialized_key(key: str) -> tuple[str, str | None]:
    """`"a.b.weight.absmax"` -> `("a.b", "weight.absmax")`; `(key, None)` for a key that is no layer tensor."""
    for suffix in _SERIALIZED_KEYS:
        if key.endswith(f".{suffix}"):
            return key[: -len(suffix) - 1], suffix
    return key, None


def bnb_checkpoint_config(pretrained_model_name_or_path, **kwargs) -> PretrainedConfig:
    """The config of a transformers + bitsandbytes checkpoint, set up to load it into lowbit layers.

    Its bitsandbytes quantization_config becomes the equivalent `LowbitConfig`; the 4-bit quant type,
    blocksize and double quantization of each layer come from the checkpoint itself. bitsandbytes does not
    need to be installed:

        config = bnb_checkpoint_config(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=config)

    `kwargs` go to `AutoConfig.from_pretrained`. (Passing `quantization_config=LowbitConfig(...)` alone does
    not work: transformers refuses a config class that differs from the checkpoint's.)
    """
    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
        if method == "bitsandbytes" or quantization.get("load_in_4bit") or quantization.get("load_in_8bit"):
            quantization = _TransformersBnbConfig.from_dict(quantization)
    if not isinstance(quantization, _TransformersBnbConfig):
        found = getattr(quantization, "quant_method", quantization)
        raise ValueError(
            f"{pretrained_model_name_or_path} is not a bitsandbytes checkpoint: its quantization_config is {found!r}"
        )
    fields = [p for p in inspect.signature(_TransformersBnbConfig.__init__).parameters if p not in ("self", "kwargs")]
    lowbit_config = LowbitConfig(**{name: getattr(quantization, name) for name in fields})
    # As a dict, the way config.json carries it: that is the form from_pretrained dispatches on.
    config.quantization_config = lowbit_config.to_dict()
    return config
