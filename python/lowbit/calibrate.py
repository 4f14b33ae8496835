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


def _check_token_ids(model: nn.Module, ids, where: str) -> None:
    """For a model that takes token ids (one with input embeddings): integer ids, [tokens] or [batch, tokens], at
    least one, each in the vocabulary. Bad ids otherwise fail deep inside the model (an embedding's "index out of
    range", a reshape), with no word of calibration."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is None or not hasattr(embeddings, "num_embeddings"):
        return
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"calibration {where}: token ids must be a tensor, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"calibration {where}: token ids must be integers (e.g. a tokenizer's input_ids), got {ids.dtype}")
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise ValueError(f"calibration {where}: token ids must be [tokens] or [batch, tokens] with at least one "
                         f"token, got shape {list(ids.shape)}")  # fmt: skip
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= embeddings.num_embeddings:
        raise ValueError(f"calibration {where}: token ids must lie in [0, {embeddings.num_embeddings}) (the model's "
                         f"vocabulary), got {low}..{high}: ids from another tokenizer?")  # fmt: skip


def _run(model: nn.Module, batch, index: int) -> None:
    where = f"batch {index}"
    if isinstance(batch, Mapping):
        if "input_ids" in batch:
            _check_token_ids(model, batch["input_ids"], f"{where} (input_ids)")
        elif "inputs_embeds" not in batch and callable(getattr(model, "get_input_embeddings", None)):
            raise ValueError(f"calibration {where}: a dict batch needs 'input_ids' (or 'inputs_embeds'); got keys "
                             f"{sorted(batch)}")  # fmt: skip
        model(**batch)
        return
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"a calibration batch must be a tensor or a dict of model inputs, not {type(batch).__name__}")
    _check_token_ids(model, batch, where)
    if batch.dim() == 1 and not batch.is_floating_point():
        batch = batch.unsqueeze(0)  # a single sequence of token ids
    model(batch.to(next(model.parameters()).device))


@torch.no_grad()
def input_second_moments(model: nn.Module, modules: Mapping[str, nn.Module], calibration) -> dict[str, torch.Tensor]:
    """Run `model` over `calibration` and return, for each named module, the mean over every input row it saw
    of x², per input feature (float32 [in_features], on the module's device).

    calibration: token ids ([tokens] or [batch, tokens]), or an iterable of batches, each a tensor (passed
    as the model's first argument) or a dict of keyword arguments."""
    return _input_means(model, modules, calibration, lambda x: (x * x).sum(0), "weigh their scale search by")


@torch.no_grad()
def input_grams(model: nn.Module, modules: Mapping[str, nn.Module], calibration) -> dict[str, torch.Tensor]:
    """As input_second_moments, the whole mean of xᵀx: [in_features, in_features] per module (GPTQ's Hessian, up
    to a factor)."""
    return _input_means(model, modules, calibration, lambda x: x.T @ x, "compensate their rounding error with")


def _input_means(model, modules, calibration, statistic, purpose: str) -> dict[str, torch.Tensor]:
    """The mean over every input row each named module saw of statistic(rows) / rows (rows: [n, in_features])."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook_for(name):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + statistic(x)
            rows[name] = rows.get(name, 0) + x.shape[0]

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    was_training = model.training
    try:
        model.eval()
        for index, batch in enumerate(_batches(calibration)):
            _run(model, batch, index)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    unseen = [name for name in modules if name not in sums]
    if unseen:
        raise ValueError(f"the calibration data never reached {len(unseen)} layer(s) to be quantized, e.g. "
                         f"{unseen[0]!r}: no activations to {purpose}")  # fmt: skip
    return {name: sums[name] / rows[name] for name in modules}
