"""Calibration: what the activation-weighted scale search learns from running the full-precision model.

For a linear layer y = x Wᵀ, quantizing weight W[n, k] by δ changes output n by x[k]·δ, so over inputs x
the expected squared output error of a weight block is Σ E[x[k]²]·δ[n, k]² (cross terms dropped). The
mean squared input activation of each input feature is therefore the weight the scale search gives to that
feature's error (a diagonal of the Hessian that GPTQ uses in full; AWQ ranks channels by the same statistic).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn


def _batches(calibration) -> Iterable:
    """A tensor of token ids ([tokens] or [batch, tokens]) is one batch; otherwise an iterable of batches."""
    if isinstance(calibration, torch.Tensor):
        return [calibration]
    if isinstance(calibration, (Mapping, str, bytes)):
        raise TypeError("calibration must be a tensor of token ids or an iterable of batches (tensors or dicts of "
                        f"model inputs), not {type(calibration).__name__}")  # fmt: skip
    return calibration


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
        return
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"a calibration batch must be a tensor or a dict of model inputs, not {type(batch).__name__}")
    if batch.dim() == 1 and not batch.is_floating_point():
        batch = batch.unsqueeze(0)  # a single sequence of token ids
    model(batch.to(next(model.parameters()).device))


@torch.no_grad()
def input_second_moments(model: nn.Module, modules: Mapping[str, nn.Module], calibration) -> dict[str, torch.Tensor]:
    """Run `model` over `calibration` and return, for each named module, the mean over every input row it saw
    of x², per input feature (float32 [in_features], on the module's device).

    calibration: token ids ([tokens] or [batch, tokens]), or an iterable of batches, each a tensor (passed
    as the model's first argument) or a dict of keyword arguments."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook_for(name):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            rows[name] = rows.get(name, 0) + x.shape[0]

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    was_training = model.training
    try:
        model.eval()
        for batch in _batches(calibration):
            _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    unseen = [name for name in modules if name not in sums]
    if unseen:
        raise ValueError(f"the calibration data never reached {len(unseen)} layer(s) to be quantized, e.g. "
                         f"{unseen[0]!r}: no activations to weigh their scale search by")  # fmt: skip
    return {name: sums[name] / rows[name] for name in modules}
