"""LoRA on lowbit layers with peft: `get_peft_model(model, LoraConfig(...))` wraps every targeted
Linear4bit / Linear8bit in a LoRA layer that runs the quantized base plus the adapter.

`import lowbit` does not import peft: it installs an import hook, and the hook connects lowbit to peft
the moment peft is imported (at once if it already is). peft has no public registry of layer types
(its custom-module mapping is experimental and per LoraConfig), so lowbit wraps three of its functions:
- `LoraModel._create_new_module`: a lowbit target becomes a `LoraLinear` (below);
- `tuners_utils._maybe_include_all_linear_layers`: `target_modules="all-linear"` includes lowbit layers;
- `PeftModel.get_nb_trainable_parameters`: each quantized weight counts as the values it stores, so
  `print_trainable_parameters()` reports honest totals (its weights are buffers, not parameters).
Those internals change between peft releases, hence SUPPORTED_PEFT: another version gets a clear error
as soon as a LoRA would wrap a lowbit layer, instead of something deep inside peft.

`LoraLinear` is peft's own LoRA `Linear` (forward: base(x) + B(A(x)) * scaling, adapters in float32)
with the operations that touch the base weight redone for a quantized one: merge dequantizes, adds the
adapters' delta and requantizes in the same format; unmerge restores the exact pre-merge quantized
tensors (kept at merge time) instead of subtracting and requantizing. Variants and initializations that
read or rewrite the base weight (DoRA, PiSSA/OLoRA/CorDA/EVA/LoftQ init, lora_bias, ...) are refused.
"""

from __future__ import annotations

import functools
import warnings

from _lowbit_autoload import after_import  # the post-import hook installed beside lowbit (site-packages)
from packaging.specifiers import SpecifierSet

from ..nn import QuantizedLinear, quantized_state_parameters, quantized_weight_count

SUPPORTED_PEFT = SpecifierSet(">=0.19,<0.22")

# LoraConfig fields that select a LoRA variant or an extra parameter lowbit layers cannot carry.
_REFUSED_OPTIONS = ("use_dora", "lora_bias", "alora_invocation_tokens", "arrow_config", "use_bdlora",
                    "velora_config", "monteclora_config", "mica", "kasa_config")  # fmt: skip
# init_lora_weights values that only initialize the adapters (the others read the base weight).
_SUPPORTED_INITS = (True, False, "gaussian")


def install_on_import() -> None:
    """Connect lowbit to peft when peft is imported (now, if it already is)."""
    after_import("peft", _install_or_warn)


def _install_or_warn(peft_module) -> None:
    try:
        install()
    except Exception as e:  # never break `import peft` for people who use no lowbit layer
        warnings.warn(f"lowbit could not connect to peft {getattr(peft_module, '__version__', '?')} ({e!r}): "
                      f"LoRA on lowbit layers needs peft {SUPPORTED_PEFT}", RuntimeWarning)  # fmt: skip


@functools.cache
def install() -> None:
    """Wrap peft's functions (see the module docstring); once per process."""
    import peft
    from peft.tuners import tuners_utils
    from peft.tuners.lora.model import LoraModel

    create_new_module = LoraModel._create_new_module

    def create_lowbit_aware(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, tuners_utils.BaseTunerLayer) else target
        if not isinstance(base, QuantizedLinear):
            return create_new_module(lora_config, adapter_name, target, **kwargs)
        if peft.__version__ not in SUPPORTED_PEFT:
            raise RuntimeError(
                f"lowbit's LoRA support works with peft {SUPPORTED_PEFT}, and peft {peft.__version__} is installed: "
                f"pip install 'peft{SUPPORTED_PEFT}'"
            )
        return lora_linear_class()(target, adapter_name, config=lora_config, **kwargs)

    LoraModel._create_new_module = staticmethod(create_lowbit_aware)
    if peft.__version__ in SUPPORTED_PEFT:
        _include_lowbit_in_all_linear(tuners_utils)
        _count_quantized_weights(peft.PeftModel)


def _include_lowbit_in_all_linear(tuners_utils) -> None:
    include_all_linear = tuners_utils._maybe_include_all_linear_layers

    def include_lowbit_too(peft_config, model):
        targets = getattr(peft_config, "target_modules", None)
        wants_all = isinstance(targets, str) and targets.lower() == tuners_utils.INCLUDE_LINEAR_LAYERS_SHORTHAND
        peft_config = include_all_linear(peft_config, model)
        if wants_all:
            output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            peft_config.target_modules |= {  # a base_layer already inside a LoRA layer is not a new target
                name for name, module in model.named_modules()
                if isinstance(module, QuantizedLinear) and module is not output and not name.endswith("base_layer")
            }  # fmt: skip
        return peft_config

    tuners_utils._maybe_include_all_linear_layers = include_lowbit_too


def _count_quantized_weights(peft_model_class) -> None:
    count = peft_model_class.get_nb_trainable_parameters

    def count_with_quantized_weights(self):
        trainable, total = count(self)
        prepared = sum(p.numel() for p in quantized_state_parameters(self))  # (counted by peft as bytes)
        return trainable, total - prepared + quantized_weight_count(self)

    peft_model_class.get_nb_trainable_parameters = count_with_quantized_weights


@functools.cache
def lora_linear_class():
    """LoraLinear, built on first use so that importing lowbit never imports peft."""
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class LoraLinear(Linear):
        """peft's LoRA Linear on a lowbit layer; merge/unmerge requantize (see the module docstring)."""

        def __init__(self, base_layer, adapter_name, config, **kwargs):
            refused = [name for name in _REFUSED_OPTIONS if getattr(config, name, None)]
            if refused:
                raise ValueError(
                    f"LoraConfig({refused[0]}=...) is not supported on lowbit layers: it reads or changes the base "
                    "weight, which is quantized. Use plain LoRA (the default)"
                )
            if config.init_lora_weights not in _SUPPORTED_INITS:
                raise ValueError(
                    f"init_lora_weights={config.init_lora_weights!r} initializes adapters from the base weight, which "
                    f"is quantized in lowbit layers; use one of {_SUPPORTED_INITS}"
                )
            if config.fan_in_fan_out:  # as peft does for nn.Linear: merging would add a transposed delta
                warnings.warn("fan_in_fan_out=True does not apply to lowbit layers (their weight is [out, in]); "
                              "setting it to False", UserWarning)  # fmt: skip
                config.fan_in_fan_out = False
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _get_in_out_features(self, module):
            # peft reads the sizes of the layer types it knows and warns about any other.
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            adapter_names = check_adapters_to_merge(self, adapter_names)
            if not adapter_names:
                return
            base = self.get_base_layer()
            if not self.merged_adapters:  # the exact quantized tensors to come back to
                self._unmerged_state = {k: v.clone() for k, v in base.state_dict().items() if k != "bias"}
            weight = base.dequantize().float()
            for adapter in adapter_names:
                if adapter in self.lora_A:
                    weight += self.get_delta_weight(adapter).float()
            if safe_merge and not weight.isfinite().all():
                raise ValueError(f"merging adapters {adapter_names} gives NaN/Inf weights; the adapters seem broken")
            base.quantize_weight_(weight.to(base.weight_dtype))  # the same format and options
            self.merged_adapters.extend(a for a in adapter_names if a in self.lora_A)

        def unmerge(self) -> None:
            if not self.merged:
                return
            self.get_base_layer().load_quantized_(self._unmerged_state)
            del self._unmerged_state
            self.merged_adapters.clear()

    return LoraLinear
