"""Named quantization configs for the report, and parsing of `--configs int8,nf4,...`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..config import LowbitConfig
from ..schemes import SCHEMES

# name → (description, LowbitConfig kwargs): every scheme of lowbit.schemes, then its variants.
PRESETS: dict[str, tuple[str, dict]] = {}
for _scheme in SCHEMES.values():
    PRESETS[_scheme.name] = (_scheme.description, _scheme.config)
    for _suffix, _description, _changes in _scheme.variants:
        PRESETS[_scheme.name + _suffix] = (_scheme.name + _description, {**_scheme.config, **_changes})
DEFAULT_CONFIGS = ("int8", "int8-wo", "int8-t0", "nf4", "nf4-dq", "nf4-aw", "fp4")


def preset(name: str) -> LowbitConfig:
    """The LowbitConfig for a preset name (see :data:`PRESETS`)."""
    try:
        return LowbitConfig(**PRESETS[name][1])
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(PRESETS)}") from None


def resolve(configs) -> dict[str, LowbitConfig]:
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
            config = preset(item) if isinstance(item, str) else item
            if name in resolved:
                # One row per name: a second config under the same name would replace the first without a word.
                raise ValueError(
                    f"two configs are both named {name!r}"
                    + (" (the same config listed twice)" if resolved[name] == config else
                       "; they differ in a field the name does not show: pass a dict {name: config} to name them")
                )  # fmt: skip
            resolved[name] = config
    else:
        raise TypeError(f"configs must be a string, a mapping or a list, not {type(configs).__name__}")
    if not resolved:
        raise ValueError("no configs to compare")
    return resolved


def describe(config) -> str:
    """A short name for a config object, e.g. 'nf4-dq' or 'int8-t0+3 overrides'."""
    name = config.default_scheme or "unquantized"
    if name == "int8" and config.llm_int8_threshold != 6.0:
        name += f"-t{config.llm_int8_threshold:g}"
    if config.load_in_4bit and config.scale_search:
        name += "-aw" if config.scale_search == "activation" else f"-{config.scale_search}"
    if getattr(config, "quantizer", None):
        name += f"-{config.quantizer}"
    if config.load_in_4bit and config.bnb_4bit_use_double_quant:
        name += "-dq"
    if config.load_in_4bit and config.blocksize != 64:
        name += f"-b{config.blocksize}"
    if config.load_in_4bit and config.bnb_4bit_compute_dtype is not None:
        name += "-" + str(config.bnb_4bit_compute_dtype).removeprefix("torch.")
    skip = getattr(config, "llm_int8_skip_modules", None)
    if skip is not None and list(skip) != ["lm_head"]:
        name += f"+skip[{','.join(skip)}]"
    overrides = getattr(config, "module_overrides", None)
    return f"{name}+{len(overrides)} overrides" if overrides else name
