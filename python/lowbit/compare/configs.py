"""Named quantization configs for the report, and parsing of `--configs int8,nf4,...`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def _config(**kwargs):
    from lowbit import LowbitConfig  # the core package; imported late so metrics work without it

    return LowbitConfig(**kwargs)


# name → (description, LowbitConfig kwargs). The first five are the default set.
PRESETS: dict[str, tuple[str, dict]] = {
    "int8": ("LLM.int8(), outlier threshold 6.0", dict(load_in_8bit=True, llm_int8_threshold=6.0)),
    "int8-t0": ("int8, no outlier columns (threshold 0)", dict(load_in_8bit=True, llm_int8_threshold=0.0)),
    "nf4": ("4-bit NormalFloat, blocksize 64", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "nf4-dq": (
        "nf4 + double-quantized scales",
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    ),
    "fp4": ("4-bit float, blocksize 64", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    "fp4-dq": (
        "fp4 + double-quantized scales",
        dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    ),
}
DEFAULT_CONFIGS = ("int8", "int8-t0", "nf4", "nf4-dq", "fp4")


def preset(name: str):
    """The LowbitConfig for a preset name (see :data:`PRESETS`)."""
    try:
        return _config(**PRESETS[name][1])
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(PRESETS)}") from None


def resolve(configs) -> dict[str, object]:
    """Normalise the `configs` argument of `compare` into an ordered {name: LowbitConfig}.

    Accepts None (the default set), a comma-separated string of preset names, a mapping
    of name → config, or an iterable of preset names and/or config objects.
    """
    if configs is None:
        configs = DEFAULT_CONFIGS
    if isinstance(configs, str):
        configs = [c.strip() for c in configs.split(",") if c.strip()]
    if isinstance(configs, Mapping):
        resolved = dict(configs)
    elif isinstance(configs, Iterable):
        resolved = {}
        for item in configs:
            name = item if isinstance(item, str) else describe(item)
            resolved[name] = preset(item) if isinstance(item, str) else item
    else:
        raise TypeError(f"configs must be a string, a mapping or a list, not {type(configs).__name__}")
    if not resolved:
        raise ValueError("no configs to compare")
    return resolved


def describe(config) -> str:
    """A short name for a config object, e.g. 'nf4-dq' or 'int8-t0+3 overrides'."""
    if config.load_in_8bit:
        name = "int8" if config.llm_int8_threshold == 6.0 else f"int8-t{config.llm_int8_threshold:g}"
    elif config.load_in_4bit:
        name = config.bnb_4bit_quant_type + ("-dq" if config.bnb_4bit_use_double_quant else "")
    else:
        name = "unquantized"
    overrides = getattr(config, "module_overrides", None)
    return f"{name}+{len(overrides)} overrides" if overrides else name
