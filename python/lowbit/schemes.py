"""The quantization schemes: the one table from a scheme's name to the layer that implements it.

`quantize_model`, the transformers quantizer, `LowbitConfig` (its `module_overrides` values and the
scheme each module gets) and the report's presets all read `SCHEMES`. Adding a scheme is one entry
here plus its layer class (a `lowbit.nn.QuantizedLinear`) and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .nn import Linear4bit, Linear8bit, QuantizedLinear

# The module_overrides value that keeps a module in full precision.
FULL_PRECISION = "none"


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    layer: type[QuantizedLinear]
    # The layer's constructor options for this scheme, from a LowbitConfig's fields.
    layer_options: Callable[[Any], dict[str, Any]]
    # LowbitConfig arguments that quantize every layer with this scheme (the report's preset of that name).
    config: dict[str, Any]
    # The report's other presets of this scheme: (name suffix, description suffix, config changes).
    variants: tuple[tuple[str, str, dict[str, Any]], ...] = ()

    def empty_layer(self, in_features: int, out_features: int, bias: bool, config, device=None, dtype=None):
        """An empty layer for `config` (a loader fills it with quantize_weight_ or load_quantized_)."""
        return self.layer(in_features, out_features, bias, device=device, dtype=dtype, **self.layer_options(config))

    def from_linear(self, linear, config, importance=None, hessian=None):
        """A quantized copy of the nn.Linear `linear`, with the options `config` gives this scheme
        (`importance`: per-input-feature weights for a scale search; `hessian`: the inputs' xᵀx for GPTQ; see
        `calibrated`)."""
        return self.layer.from_linear(linear, importance, hessian=hessian, **self.layer_options(config))

    def calibrated_search(self, config) -> bool:
        """Whether this scheme under `config` runs the activation-weighted scale search."""
        return bool(self.layer_options(config).get("scale_search")) and config.scale_search == "activation"

    def calibrated(self, config) -> bool:
        """Whether this scheme under `config` weighs its quantization by calibration activations (an
        activation-weighted scale search, or GPTQ)."""
        return self.calibrated_search(config) or getattr(config, "quantizer", None) == "gptq"


def _four_bit(quant_type: str) -> Callable[[Any], dict[str, Any]]:
    def options(config) -> dict[str, Any]:
        return {
            "quant_type": quant_type,
            "blocksize": config.blocksize,
            "double_quant": config.bnb_4bit_use_double_quant,
            "compute_dtype": config.bnb_4bit_compute_dtype,
            "quant_storage": config.bnb_4bit_quant_storage,
            "scale_search": config.scale_search is not None,
        }

    return options


_FOUR_BIT_VARIANTS = (
    ("-dq", " + double-quantized scales", dict(bnb_4bit_use_double_quant=True)),
    ("-mse", ", scales searched for the least weight error", dict(scale_search="mse")),
    ("-aw", ", scales searched for the least activation-weighted error", dict(scale_search="activation")),
    ("-aw-dq", ", activation-weighted scale search + double-quantized scales",
     dict(scale_search="activation", bnb_4bit_use_double_quant=True)),
    ("-gptq", ", GPTQ error compensation on calibration text", dict(quantizer="gptq")),
    ("-aw-gptq", ", GPTQ with each block's scale by the activation-weighted search",
     dict(quantizer="gptq", scale_search="activation")),
    ("-aw-gptq-dq", ", GPTQ + activation-weighted scale search + double-quantized scales",
     dict(quantizer="gptq", scale_search="activation", bnb_4bit_use_double_quant=True)),
)  # fmt: skip

SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8", "LLM.int8(), outlier threshold 6.0", Linear8bit,
               lambda config: {"threshold": config.llm_int8_threshold}, dict(load_in_8bit=True),
               (("-t0", ", no outlier columns (threshold 0)", dict(llm_int8_threshold=0.0)),)),
        Scheme("int8-wo", "int8 weights, activations in float (W8A16)", Linear8bit,
               lambda config: {"weight_only": True}, dict(load_in_8bit=True, llm_int8_weight_only=True),
               (("-gptq", ", GPTQ error compensation on calibration text", dict(quantizer="gptq")),)),
        Scheme("nf4", "4-bit NormalFloat, blocksize 64", Linear4bit, _four_bit("nf4"),
               dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), _FOUR_BIT_VARIANTS),
        Scheme("fp4", "4-bit float, blocksize 64", Linear4bit, _four_bit("fp4"),
               dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), _FOUR_BIT_VARIANTS),
    )
}  # fmt: skip

# Every lowbit layer class, for isinstance checks.
LAYERS: tuple[type[QuantizedLinear], ...] = tuple(dict.fromkeys(s.layer for s in SCHEMES.values()))


def get(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {name!r}; expected one of {list(SCHEMES)}") from None
