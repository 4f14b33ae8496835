"""Swap nn.Linear modules for lowbit layers in any nn.Module (no transformers needed)."""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn as nn

from .calibrate import BlockChain, input_grams, input_second_moments
from .config import LowbitConfig
from .formats import named_errors
from .schemes import SCHEMES, Scheme


def _tied_linears(model: nn.Module) -> set[str]:
    """Linear layers whose weight is shared with another module (e.g. an lm_head tied to the embeddings)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def kept_in_full_precision(model: nn.Module) -> set[str]:
    """The modules no config quantizes, by one rule for quantize_model and from_pretrained alike: tied weights (a
    quantized copy would break the tie; transformers' tied keys count too, as a meta-device model may not share
    the tensors yet) and a transformers model's `_keep_in_fp32_modules`. Everything else, lm_head included, is the
    config's to decide (its default llm_int8_skip_modules keeps lm_head)."""
    kept = _tied_linears(model)
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}
    kept.update(k.removesuffix(".weight") for pair in tied_keys.items() for k in pair)
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or ())
    if keep_fp32:
        from transformers.quantizers.quantizers_utils import should_convert_module

        kept.update(name for name, _ in model.named_modules() if name and not should_convert_module(name, keep_fp32))
    return kept


def _targets(model: nn.Module, config: LowbitConfig, skip: Iterable[str]) -> list[tuple[str, nn.Linear, Scheme]]:
    if isinstance(skip, str):
        raise TypeError(f"skip must be a collection of module names, got the string {skip!r}")
    skip = set(skip) | kept_in_full_precision(model)
    found = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name not in skip:  # subclasses may carry behaviour we would drop
            scheme = config.scheme_for(name)
            if scheme is not None:
                found.append((name, module, SCHEMES[scheme]))
    if not found:
        linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
        raise ValueError(
            f"the config quantizes no layer of {type(model).__name__}: "
            + (f"of its nn.Linear layers ({_first(linears)}) its overrides and skip lists keep every one in full "
               f"precision (tied or kept by the model: {_first(sorted(skip & set(linears))) or 'none'})"
               if linears else "it has no nn.Linear layer")  # fmt: skip
        )
    return found


def _first(names, shown: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _blocks_in_order(names: list[str]) -> dict[str, list[str]]:
    """The names grouped by the numbered block they sit in ("model.layers.3": [its names]), blocks in model order; a
    name outside any numbered block is a group of its own, under its own name."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = re.match(r"(.*?\.\d+)\.", name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    return groups


def _quantize_with_gptq(model: nn.Module, config: LowbitConfig, targets, calibration) -> nn.Module:
    """GPTQ, one block at a time: each block's layers are quantized from the inputs the blocks before them give
    once they are quantized (the paper's sequential pipeline), so each compensates the error upstream too. Within a
    block the layers see full-precision inputs (no "true-sequential" split: it would cost four forward passes per
    block instead of one). Where the blocks are one stack (a decoder's layers), each block runs from its cached
    inputs (calibrate.BlockChain); otherwise the whole model runs once per block. All or nothing, as quantize_model."""
    by_name = {name: (linear, scheme) for name, linear, scheme in targets}
    blocks = _blocks_in_order(list(by_name))
    chain = _block_chain(model, list(blocks), calibration)
    swapped = []
    try:
        for position, (prefix, names) in enumerate(blocks.items()):
            modules = {name: by_name[name][0] for name in names}
            if chain is not None:
                while chain.index < _block_number(prefix):  # blocks with nothing to quantize
                    chain.advance()
                hessians = chain.grams(modules)
            else:
                hessians = input_grams(model, modules, calibration)
            for name in names:
                linear, scheme = by_name[name]
                hessian = hessians.pop(name)
                # The activation-aware scale search weighs columns by their mean squared input: H's diagonal.
                importance = torch.diagonal(hessian).clone() if scheme.calibrated_search(config) else None
                with named_errors(f"module {name!r}", "(the model was left unchanged)"):
                    layer = scheme.from_linear(linear, config, importance, hessian=hessian)
                model.set_submodule(name, layer)
                swapped.append((name, linear))
            if chain is not None and position + 1 < len(blocks):
                chain.advance()
    except BaseException:
        for name, linear in reversed(swapped):
            model.set_submodule(name, linear)
        raise
    return model


def _block_number(prefix: str):
    """N of a block prefix "model.layers.N", or None for a prefix that is not a numbered entry."""
    number = prefix.rpartition(".")[2]
    return int(number) if number.isdigit() else None


def _block_chain(model: nn.Module, prefixes: list[str], calibration) -> "BlockChain | None":
    """A BlockChain over the stack the blocks sit in, when every block is a numbered entry of one ModuleList (a
    decoder's layers), starting at the first of them; else None."""
    parents = {prefix.rpartition(".")[0] for prefix in prefixes}
    if len(parents) != 1 or any(_block_number(prefix) is None for prefix in prefixes):
        return None
    layers = model.get_submodule(parents.pop())
    if not isinstance(layers, nn.ModuleList):
        return None
    return BlockChain.capture(model, layers, _block_number(prefixes[0]), calibration)


def replace_linears(model: nn.Module, config: LowbitConfig, skip: Iterable[str] = ()) -> list[str]:
    """Replace each nn.Linear that `config` quantizes by an EMPTY lowbit layer on the same device
    (meta included) and dtype; nothing is quantized or allocated on a real device for meta models.
    Loaders then fill each layer with quantize_weight_() or load_quantized_(). Returns the names."""
    names = []
    config = LowbitConfig.coerce(config)
    for name, linear, scheme in _targets(model, config, skip):
        w = linear.weight
        layer = scheme.empty_layer(linear.in_features, linear.out_features, linear.bias is not None, config,
                                   device=w.device, dtype=w.dtype)  # fmt: skip
        if linear.bias is not None:
            layer.bias = linear.bias
        model.set_submodule(name, layer)
        names.append(name)
    return names


@torch.no_grad()
def quantize_model(model: nn.Module, config: LowbitConfig, skip: Iterable[str] = (), calibration=None) -> nn.Module:
    """Quantize `model` in place: every nn.Linear that `config` selects becomes a lowbit layer holding
    its quantized weight. Tied weights, `lm_head` (unless configured otherwise) and the modules named in `skip`
    (exact qualified names, e.g. "model.layers.0.mlp.down_proj"; for patterns use the config's module_overrides
    with "none", or its llm_int8_skip_modules, which match dotted components) stay in full precision. `config`
    may also be transformers' BitsAndBytesConfig or a dict of LowbitConfig fields. Returns `model`.

    calibration: what `config.scale_search="activation"` runs the full-precision model on first (token ids,
    or an iterable of batches; see lowbit.calibrate.input_second_moments). Text the model will be
    evaluated on does not belong here.

    All or nothing: every layer is quantized before any is swapped in, so a weight that cannot be
    quantized (NaN, Inf, beyond float16 for int8) raises an error naming its module and leaves `model`
    as it was. (The quantized layers, a fraction of the full-precision size, exist beside it until then.)"""
    config = LowbitConfig.coerce(config)
    targets = _targets(model, config, skip)
    if config.quantizer == "gptq":
        if calibration is None:
            raise ValueError('quantizer="gptq" compensates each layer\'s rounding error as its inputs weigh it: pass '
                             "calibration=<token ids> (a few hundred tokens of text like the model's use, not the "
                             "evaluation text)")  # fmt: skip
        return _quantize_with_gptq(model, config, targets, calibration)
    calibrated = {name: linear for name, linear, scheme in targets if scheme.calibrated(config)}
    if calibrated and calibration is None:
        raise ValueError('scale_search="activation" weighs each layer\'s quantization by its input activations: '
                         "pass calibration=<token ids> (a few hundred tokens of text like the model's use, not "
                         'the evaluation text), or use scale_search="mse", which needs no data')  # fmt: skip
    if calibration is not None and not calibrated:
        raise ValueError('calibration= is used only by scale_search="activation", which no layer of this config '
                         f"has (scale_search={config.scale_search!r}): drop calibration=, or set "
                         'scale_search="activation"')  # fmt: skip
    importance = input_second_moments(model, calibrated, calibration) if calibrated else {}
    quantized = []
    for name, linear, scheme in targets:
        with named_errors(f"module {name!r}", "(the model was left unchanged)"):
            quantized.append((name, scheme.from_linear(linear, config, importance.get(name))))
    for name, layer in quantized:
        model.set_submodule(name, layer)
    return model
