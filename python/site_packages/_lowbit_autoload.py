"""Lets transformers load a checkpoint saved by lowbit in a process that never imports lowbit.

`lowbit_autoload.pth` (installed beside this module in site-packages) imports this module when Python starts. It
imports nothing heavy: it waits for `transformers.quantizers.auto` to be imported, then wraps the two functions
through which transformers reads a checkpoint's `quantization_config`. When one of them meets quant_method
"lowbit" that transformers does not know yet, it imports lowbit, which registers the method, and the load goes on
through lowbit. Without this, transformers only logs "Unknown quantization type" and loads the int8 codes as float
weights: a model that runs and generates nonsense. If lowbit cannot be imported, the load fails, saying why.
"""

import importlib.abc
import importlib.machinery
import sys

_QUANT_METHOD = "lowbit"
_MODULE = "transformers.quantizers.auto"


def _import_lowbit_for(quantization_config, auto) -> bool:
    """Imports lowbit when this config is lowbit's and transformers does not know the method yet; True if it did."""
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    if method != _QUANT_METHOD or _QUANT_METHOD in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        return False
    try:
        import lowbit  # noqa: F401  (registers "lowbit" with transformers)
    except Exception as e:
        raise ImportError(
            f"this checkpoint was quantized with lowbit (quant_method {_QUANT_METHOD!r}) and lowbit is installed, "
            f"but importing it failed: {e}. Loading without lowbit would read its quantized codes as weights."
        ) from e
    return True


def _patch(auto) -> None:
    supports = auto.AutoHfQuantizer.supports_quant_method
    from_dict = auto.AutoQuantizationConfig.from_dict.__func__

    def supports_quant_method(quantization_config_dict):
        _import_lowbit_for(quantization_config_dict, auto)
        return supports(quantization_config_dict)

    def from_dict_with_lowbit(cls, quantization_config_dict: dict):
        if _import_lowbit_for(quantization_config_dict, auto):
            # lowbit wrapped from_dict with its own checks when it registered: go through them.
            return auto.AutoQuantizationConfig.from_dict(quantization_config_dict)
        return from_dict(cls, quantization_config_dict)

    auto.AutoHfQuantizer.supports_quant_method = staticmethod(supports_quant_method)
    auto.AutoQuantizationConfig.from_dict = classmethod(from_dict_with_lowbit)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` once, right after the module called `name` has been executed."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_call(module):
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            self.callback(module)

        spec.loader.exec_module = exec_then_call
        return spec


def after_import(name: str, callback) -> None:
    """Call `callback(module)` when the module `name` is imported: now if it already is, else right after its
    import (lowbit's peft integration connects the same way)."""
    if name in sys.modules:
        callback(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name and f.callback is callback for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _patch_or_warn(auto) -> None:
    try:
        _patch(auto)
    except Exception as e:  # a transformers whose internals moved: never break `import transformers`
        import warnings

        warnings.warn(f"lowbit could not hook into transformers ({e!r}): `import lowbit` before loading a lowbit "
                      "checkpoint", RuntimeWarning)  # fmt: skip


after_import(_MODULE, _patch_or_warn)
