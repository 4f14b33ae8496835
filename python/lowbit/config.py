"""LowbitConfig: which modules to quantize and how. Accepts every BitsAndBytesConfig field under the
same name and default, so `from lowbit import BitsAndBytesConfig` is a drop-in swap."""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import (
    check_blocksize,
    check_quant_type,
    check_threshold,
    dtype_name,
    named_errors,
    parse_dtype,
    parse_storage,
)
from .schemes import FULL_PRECISION, SCHEMES
# How 4-bit layers choose each block's scale (the stored format is the same for all):
#   None          the block's absmax, as bitsandbytes does;
#   "mse"         searched to minimise the block's squared weight error (data-free);
#   "activation"  searched to minimise the error weighted by each input feature's mean squared activation on
#                 calibration data: quantize_model(..., calibration=...) only, as loading cannot run the model.
SCALE_SEARCHES = (None, "mse", "activation")
# How codes are chosen (the stored format is the same for all):
#   None     round to nearest, each weight on its own;
#   "gptq"   GPTQ: column by column, each column's rounding error moved onto the columns not yet quantized as the
#            layer's calibration inputs weigh it (lowbit.gptq): quantize_model(..., calibration=...) only.
QUANTIZERS = (None, "gptq")
# Modules kept in full precision when llm_int8_skip_modules is not given (as transformers does).
DEFAULT_SKIP = ("lm_head",)


def _component_match(name: str, key: str) -> bool:
    """Whether `key` names `name` or a whole dotted run of its components ("mlp.down_proj" in "layers.0.mlp.down_proj")."""
    return f".{key}." in f".{name}."


class LowbitConfig(QuantizationConfigMixin):
    """How lowbit quantizes a model.

    Pick the default scheme with `load_in_8bit=True` (LLM.int8(); with `llm_int8_weight_only=True` the same
    int8 weights with activations kept in float) or `load_in_4bit=True` (`bnb_4bit_quant_type` "nf4" or
    "fp4"), or equivalently `bits=8` / `bits=4`.
    Note: `bnb_4bit_quant_type` defaults to "fp4", as in transformers' BitsAndBytesConfig, while
    `Linear4bit` and the ops default to "nf4" (usually the more accurate); pass it explicitly.
    `module_overrides` maps regular expressions (searched in a module's qualified name, first match
    wins) to a scheme of lowbit.schemes ("int8", "int8-wo", "nf4", "fp4") or "none" (full precision).
    `llm_int8_skip_modules` lists modules kept in full precision (default: lm_head).
    `scale_search` ("mse" or "activation"; see SCALE_SEARCHES) makes 4-bit layers search each block's scale
    instead of taking its absmax: same checkpoint format, loadable by bitsandbytes."""

    # 2: llm_int8_weight_only (older lowbit refuses a config that has it, rather than ignoring it)
    # 3: scale_search
    # 4: module_overrides saved as a list of [pattern, scheme] pairs: transformers writes config.json with sorted
    #    keys, which reordered a dict's patterns, and the first match wins (a dict is still read)
    # 5: quantizer
    VERSION = 5

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: Optional[list[str]] = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: Optional[torch.dtype | str] = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: Optional[torch.dtype | str] = None,
        blocksize: int = 64,
        llm_int8_weight_only: bool = False,
        scale_search: Optional[str] = None,
        quantizer: Optional[str] = None,
        module_overrides: Optional[dict[str, str] | list[tuple[str, str]]] = None,
        bits: Optional[int] = None,
        **kwargs: Any,
    ):
        self.quant_method = "lowbit"
        kwargs.pop("quant_method", None)
        version = kwargs.pop("lowbit_config_version", self.VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"lowbit_config_version must be a positive integer, got {version!r}")
        if version > self.VERSION:
            raise ValueError(f"this config was written by a newer lowbit (config version {version} > {self.VERSION})")
        if kwargs:
            raise ValueError(f"LowbitConfig got unknown arguments {sorted(kwargs)}")
        # Flags take only True or False, as transformers' own config insists: a string such as "false" is truthy.
        flags = dict(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
                     llm_int8_enable_fp32_cpu_offload=llm_int8_enable_fp32_cpu_offload,
                     llm_int8_has_fp16_weight=llm_int8_has_fp16_weight, llm_int8_weight_only=llm_int8_weight_only)  # fmt: skip
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
        if bits is not None:
            if bits not in (4, 8):
                raise ValueError(f"bits must be 8 or 4, got {bits!r}")
            if (load_in_8bit and bits != 8) or (load_in_4bit and bits != 4):
                raise ValueError(f"bits={bits} contradicts load_in_8bit={load_in_8bit}, load_in_4bit={load_in_4bit}")
            load_in_8bit, load_in_4bit = bits == 8, bits == 4
        if load_in_8bit and load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit are both True; choose one")
        if not (load_in_8bit or load_in_4bit or module_overrides):
            raise ValueError("nothing to quantize: set load_in_8bit=True or load_in_4bit=True, or give module_overrides")
        if llm_int8_has_fp16_weight:
            raise ValueError("llm_int8_has_fp16_weight=True (training with fp16 master weights) is not supported: "
                             "lowbit keeps weights quantized; train adapters (LoRA) on top instead")
        threshold = check_threshold(llm_int8_threshold, "llm_int8_threshold")
        if llm_int8_skip_modules is not None and (
            isinstance(llm_int8_skip_modules, str) or not all(isinstance(m, str) for m in llm_int8_skip_modules)
        ):
            raise ValueError(f"llm_int8_skip_modules must be a list of module names, got {llm_int8_skip_modules!r}")
        _field("bnb_4bit_quant_type", check_quant_type, bnb_4bit_quant_type)
        _field("blocksize", check_blocksize, blocksize)
        compute_dtype = None if bnb_4bit_compute_dtype is None else _field(
            "bnb_4bit_compute_dtype", parse_dtype, bnb_4bit_compute_dtype)
        storage = torch.uint8 if bnb_4bit_quant_storage is None else _field(
            "bnb_4bit_quant_storage", parse_storage, bnb_4bit_quant_storage)
        if scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale_search must be one of {list(SCALE_SEARCHES)}, got {scale_search!r}")
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {list(QUANTIZERS)}, got {quantizer!r}")
        overrides = _ordered_overrides(module_overrides)
        for pattern, scheme in overrides.items():
            if scheme not in (*SCHEMES, FULL_PRECISION):
                raise ValueError(f"module_overrides[{pattern!r}] = {scheme!r}; expected one of {[*SCHEMES, FULL_PRECISION]}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"module_overrides pattern {pattern!r} is not a valid regular expression: {e}") from e

        self.load_in_8bit = bool(load_in_8bit)
        self.load_in_4bit = bool(load_in_4bit)
        self.llm_int8_threshold = threshold
        self.llm_int8_skip_modules = None if llm_int8_skip_modules is None else list(llm_int8_skip_modules)
        self.llm_int8_weight_only = bool(llm_int8_weight_only)
        self.scale_search = scale_search
        self.quantizer = quantizer
        self.llm_int8_enable_fp32_cpu_offload = bool(llm_int8_enable_fp32_cpu_offload)
        self.llm_int8_has_fp16_weight = False
        self.bnb_4bit_compute_dtype = compute_dtype
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bool(bnb_4bit_use_double_quant)
        self.bnb_4bit_quant_storage = storage
        self.blocksize = blocksize
        self.module_overrides = overrides

    @property
    def bits(self) -> Optional[int]:
        return 8 if self.load_in_8bit else 4 if self.load_in_4bit else None

    @property
    def default_scheme(self) -> Optional[str]:
        """The scheme of every module that no override or skip list names ("int8", "int8-wo", "nf4", "fp4"), or None."""
        if self.load_in_8bit:
            return "int8-wo" if self.llm_int8_weight_only else "int8"
        return self.bnb_4bit_quant_type if self.load_in_4bit else None

    def scheme_for(self, name: str) -> Optional[str]:
        """The scheme ("int8", "int8-wo", "nf4", "fp4") of the module called `name`, or None to keep it in full precision."""
        for pattern, scheme in self.module_overrides.items():
            if re.search(pattern, name):
                return None if scheme == FULL_PRECISION else scheme
        skip = DEFAULT_SKIP if self.llm_int8_skip_modules is None else self.llm_int8_skip_modules
        if any(_component_match(name, key) for key in skip):
            return None
        return self.default_scheme

    def to_dict(self) -> dict[str, Any]:
        # No load_in_4bit/load_in_8bit keys: a truthy one would route a reload to bitsandbytes.
        return {
            "quant_method": self.quant_method,
            "lowbit_config_version": self.VERSION,
            "bits": self.bits,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": self.llm_int8_skip_modules,
            "llm_int8_weight_only": self.llm_int8_weight_only,
            "scale_search": self.scale_search,
            "quantizer": self.quantizer,
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_compute_dtype": None if self.bnb_4bit_compute_dtype is None else dtype_name(self.bnb_4bit_compute_dtype),
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_quant_storage": dtype_name(self.bnb_4bit_quant_storage),
            "blocksize": self.blocksize,
            "module_overrides": [[pattern, scheme] for pattern, scheme in self.module_overrides.items()],
        }

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """A config from `to_dict()`'s output, config.json's quantization_config, or transformers'
        BitsAndBytesConfig(...).to_dict() (whose private "_load_in_4bit"-style copies are dropped)."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"from_dict takes a dict, got {type(config_dict).__name__}")
        fields = {k: v for k, v in config_dict.items() if not k.startswith("_")}
        return super().from_dict(fields, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def coerce(cls, config: Any) -> "LowbitConfig":
        """`config` as a LowbitConfig: one already, a dict of its fields, or transformers' BitsAndBytesConfig
        (the same fields, so the same quantization)."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if type(config).__name__ == "BitsAndBytesConfig" and callable(getattr(config, "to_dict", None)):
            return cls.from_dict(config.to_dict())
        raise TypeError(f"expected a lowbit.LowbitConfig (or transformers' BitsAndBytesConfig, or a dict of its "
                        f"fields), got {type(config).__name__}")  # fmt: skip

    def update(self, **kwargs) -> dict[str, Any]:
        """Set the given fields, validated as the constructor validates them (the whole config is checked again:
        `update(blocksize=7)` raises as `LowbitConfig(blocksize=7)` does); returns the kwargs that are not fields."""
        known = {k: v for k, v in kwargs.items() if hasattr(self, k) and k != "bits"}
        fields = {k: v for k, v in self.to_dict().items() if k != "quant_method"}
        if {"load_in_8bit", "load_in_4bit"} & known.keys():
            fields.pop("bits")
            fields.setdefault("load_in_8bit", self.load_in_8bit)
            fields.setdefault("load_in_4bit", self.load_in_4bit)
        validated = LowbitConfig(**{**fields, **known})
        self.__dict__.update(validated.__dict__)
        return {k: v for k, v in kwargs.items() if k not in known}

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LowbitConfig) and self.to_dict() == other.to_dict()


def _ordered_overrides(module_overrides) -> dict[str, str]:
    """module_overrides as an ordered {pattern: scheme}: from a dict (its order) or a list of (pattern, scheme)
    pairs (what to_dict writes, so the order survives config.json's sorted keys)."""
    if module_overrides is None:
        return {}
    if isinstance(module_overrides, dict):
        pairs = list(module_overrides.items())
    elif isinstance(module_overrides, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in module_overrides
    ):
        pairs = [tuple(p) for p in module_overrides]
    else:
        raise TypeError("module_overrides must be a dict {regex: scheme} or a list of (regex, scheme) pairs, got "
                        f"{module_overrides!r}")  # fmt: skip
    for pattern, scheme in pairs:
        if not isinstance(pattern, str) or not isinstance(scheme, str):
            raise TypeError(f"module_overrides maps regular expressions (str) to scheme names (str); got "
                            f"{pattern!r}: {scheme!r}")  # fmt: skip
    patterns = [pattern for pattern, _ in pairs]
    if len(set(patterns)) != len(patterns):
        raise ValueError(f"module_overrides names a pattern twice: {patterns}")
    return dict(pairs)


def _field(name: str, check, value):
    """check(value), its error naming the config field."""
    with named_errors(name):
        return check(value)


BitsAndBytesConfig = LowbitConfig
