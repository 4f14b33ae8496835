"""Export a model quantized with lowbit as a transformers + bitsandbytes checkpoint.

Why: serving engines and plain transformers know bitsandbytes checkpoints (`quant_method: "bitsandbytes"`),
not lowbit's own "lowbit" method. lowbit's layers already save bitsandbytes' tensors byte for byte (names,
dtypes, packed nibbles, quant_state JSON, int8 `SCB` and `weight_format`), so such a checkpoint differs from
one bitsandbytes wrote only in config.json's `quantization_config`. `export_bitsandbytes` saves the model with
its own `save_pretrained` while its config carries the equivalent transformers `BitsAndBytesConfig`.

That config is read off the layers themselves, not off the LowbitConfig that made them: a layer loaded from a
checkpoint keeps that checkpoint's options, and a model quantized with `quantize_model` has no config at all.

A BitsAndBytesConfig gives every quantized layer one scheme and one set of options, and names the modules
left in full precision (`llm_int8_skip_modules`). A model it cannot describe is refused with a ValueError
before anything is written: several schemes (mixed int8/nf4/fp4), int8 layers with different thresholds,
4-bit layers with different double quantization, compute dtype or storage dtype, a 4-bit blocksize
bitsandbytes does not compute with, layers that hold no weight, or no lowbit layer at all.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..formats import dtype_name
from ..nn import Linear4bit, Linear8bit, QuantizedLinear
from ..schemes import LAYERS, SCHEMES

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel

# The 4-bit blocksizes bitsandbytes computes with: each of its 4-bit ops checks
# `blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096)` (bitsandbytes 0.50 `_ops.py`, and
# `functional.dequantize_4bit`). Loading a checkpoint reads each layer's blocksize from its quant_state
# without a check (`QuantState.from_dict`, `Params4bit.from_prequantized`), so a blocksize outside these
# would load and fail at the first forward.
BNB_4BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# The BitsAndBytesConfig field each layer attribute becomes: bitsandbytes applies one value of each to every
# layer of that kind.
_SHARED_OPTIONS: dict[type[QuantizedLinear], dict[str, str]] = {
    Linear8bit: {"llm_int8_threshold": "threshold"},
    Linear4bit: {
        "bnb_4bit_use_double_quant": "double_quant",
        "bnb_4bit_compute_dtype": "compute_dtype",
        "bnb_4bit_quant_storage": "quant_storage",
    },
}


def export_bitsandbytes(model: PreTrainedModel, out_dir: str | os.PathLike, **save_kwargs: Any) -> BitsAndBytesConfig:
    """Save `model` (quantized with lowbit) to `out_dir` as a transformers + bitsandbytes checkpoint.

    `AutoModelForCausalLM.from_pretrained(out_dir)` then loads it with transformers' bitsandbytes quantizer
    into `bitsandbytes.nn.Linear8bitLt` / `Linear4bit` layers holding the same bytes, lowbit installed or not
    (and lowbit loads it back with `bnb_checkpoint_config`). `save_kwargs` go to `model.save_pretrained`
    (`max_shard_size`, `push_to_hub`, ...). Returns the config written as `quantization_config`.

    Raises ValueError, naming the layers, for a model one BitsAndBytesConfig cannot describe (see the module
    docstring); nothing is written then. A 4-bit `compute_dtype` of None (lowbit: the input's dtype) becomes
    bitsandbytes' default, float32.
    """
    # transformers' model classes load in ~0.4 s: imported on use, so `import lowbit` stays light.
    from transformers import PreTrainedModel

    # peft is never imported here: if it is not loaded, no model holds its layers.
    peft, tuners = sys.modules.get("peft"), sys.modules.get("peft.tuners.tuners_utils")
    if peft is not None and isinstance(model, peft.PeftModel):
        raise TypeError(
            f"export_bitsandbytes got a peft {type(model).__name__}: merge the adapters into the quantized weights "
            "first (model = model.merge_and_unload()) and export that; bitsandbytes cannot load LoRA layers"
        )
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"export_bitsandbytes needs a transformers PreTrainedModel (it saves with save_pretrained and "
            f"writes config.json), got {type(model).__name__}"
        )
    adapters = [name for name, module in model.named_modules()
                if tuners is not None and isinstance(module, tuners.BaseTunerLayer)]  # fmt: skip
    if adapters:
        raise ValueError(
            f"cannot export: {_listing(adapters)} are peft adapter layers (unmerged LoRA): bitsandbytes cannot load "
            "them. Merge first (peft_model.merge_and_unload()) and export the merged model"
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"export_bitsandbytes: {os.fspath(out_dir)!r} is a file; give a directory to write into")
    config = _bitsandbytes_config(model)
    with _quantization_config(model.config, config):
        model.save_pretrained(out_dir, **save_kwargs)
    return config


def _bitsandbytes_config(model: nn.Module) -> BitsAndBytesConfig:
    """The transformers BitsAndBytesConfig that describes `model`'s lowbit layers, or a ValueError saying
    why none does."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LAYERS)}
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no lowbit layers: nothing to export as a bitsandbytes checkpoint "
            "(quantize it with lowbit first)"
        )
    empty = [name for name, layer in layers.items() if not layer.holds_weight]
    if empty:
        raise ValueError(f"cannot export: lowbit layers {_listing(empty)} hold no weight (built empty for a loader "
                         "to fill); load or quantize them first")  # fmt: skip
    weight_only = [name for name, layer in layers.items() if getattr(layer, "weight_only", False)]
    if weight_only:
        raise ValueError(
            f"cannot export as a bitsandbytes checkpoint: layers {_listing(weight_only)} are weight-only int8 "
            "(activations in float), which bitsandbytes' int8 layers do not compute: they would run LLM.int8() "
            "on the same weights and give other numbers. Quantize with load_in_8bit (LLM.int8()) to export"
        )
    # A layer's scheme, as lowbit.schemes names it: "int8", or the 4-bit quant type.
    schemes = {name: "int8" if layer.bits == 8 else layer.quant_type for name, layer in layers.items()}
    scheme = _shared(schemes, "one quantization scheme to every quantized layer",
                     'Quantize it with one scheme ("none" module_overrides, kept in full precision, are fine)')
    layer_type = SCHEMES[scheme].layer
    options = {
        field: _shared({name: getattr(layer, attribute) for name, layer in layers.items()},
                       f"one {field} to every layer", "Quantize every layer with the same options")
        for field, attribute in _SHARED_OPTIONS[layer_type].items()
    }  # fmt: skip
    if layer_type is Linear4bit:
        unsupported = {name: layer.blocksize for name, layer in layers.items()
                       if layer.blocksize not in BNB_4BIT_BLOCKSIZES}  # fmt: skip
        if unsupported:
            raise ValueError(
                f"cannot export as a bitsandbytes checkpoint: bitsandbytes computes with the 4-bit blocksizes "
                f"{list(BNB_4BIT_BLOCKSIZES)} only, but this model has blocksize {_by_value(unsupported)}"
            )
    from transformers import BitsAndBytesConfig

    # A scheme's LowbitConfig arguments (load_in_8bit, or load_in_4bit and the quant type) are BitsAndBytesConfig's.
    return BitsAndBytesConfig(**SCHEMES[scheme].config, **options, llm_int8_skip_modules=_full_precision_modules(model))


def _full_precision_modules(model: nn.Module) -> list[str]:
    """The modules transformers' bitsandbytes loader would quantize that lowbit kept in full precision (lm_head,
    tied weights, "none" overrides, skip lists). The loader swaps every module that is exactly an nn.Linear, or a
    Conv1D (`replace_with_bnb_linear`); lowbit has already swapped the ones it quantized, so the rest are these."""
    from transformers.pytorch_utils import Conv1D

    modules = model.named_modules()
    return sorted(name for name, module in modules if type(module) is nn.Linear or isinstance(module, Conv1D))


def _shared(values: dict[str, Any], what: str, remedy: str) -> Any:
    """The value every layer in `values` (name -> value) has, or a ValueError listing the layers of each value."""
    if len(set(values.values())) > 1:
        raise ValueError(f"cannot export as a bitsandbytes checkpoint: bitsandbytes applies {what}, but this model has "
                         f"{_by_value(values)}. {remedy}")  # fmt: skip
    return next(iter(values.values()))


def _by_value(values: dict[str, Any]) -> str:
    """`{"a": 6.0, "b": 0.0, "c": 6.0}` -> "6.0 in a, c; 0.0 in b"."""
    names_by_value = defaultdict(list)
    for name, value in values.items():
        names_by_value[value].append(name)
    return "; ".join(f"{_show(value)} in {_listing(names)}" for value, names in names_by_value.items())


def _show(value: Any) -> str:
    return dtype_name(value) if isinstance(value, torch.dtype) else repr(value)


def _listing(names: list[str], shown: int = 3) -> str:
    """A few layer names and how many more: a message about a 200-layer model stays readable."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@contextmanager
def _quantization_config(config: PretrainedConfig, quantization_config: BitsAndBytesConfig):
    """`config.quantization_config` is `quantization_config` inside, and what it was (or absent) again after.

    Swapped in, rather than config.json rewritten afterwards, so that everything save_pretrained writes or
    uploads (push_to_hub) carries it, and the caller's model is left as it was."""
    missing = object()
    before = config.__dict__.get("quantization_config", missing)
    config.quantization_config = quantization_config
    try:
        yield
    finally:
        if before is missing:
            del config.quantization_config
        else:
            config.quantization_config = before
