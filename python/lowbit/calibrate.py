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
    return _input_means(model, modules, calibration, _gram, GPTQ_PURPOSE)


GPTQ_PURPOSE = "compensate their rounding error with"


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x


def _input_means(model, modules, calibration, statistic, purpose: str) -> dict[str, torch.Tensor]:
    """The mean over every input row each named module saw of statistic(rows) / rows (rows: [n, in_features])."""
    with _InputStatistics(modules, statistic) as stats:
        was_training = model.training
        try:
            model.eval()
            for index, batch in enumerate(_batches(calibration)):
                _run(model, batch, index)
        finally:
            model.train(was_training)
    return stats.means(purpose)


class _InputStatistics:
    """While entered, sums statistic(x) and counts the rows x of every input the named modules see."""

    def __init__(self, modules: Mapping[str, nn.Module], statistic):
        self.modules, self.statistic = modules, statistic
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def __enter__(self):
        def hook_for(name):
            def hook(_module, inputs, _output):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                self.sums[name] = self.sums.get(name, 0) + self.statistic(x)
                self.rows[name] = self.rows.get(name, 0) + x.shape[0]

            return hook

        self.handles = [module.register_forward_hook(hook_for(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def means(self, purpose: str) -> dict[str, torch.Tensor]:
        unseen = [name for name in self.modules if name not in self.sums]
        if unseen:
            raise ValueError(f"the calibration data never reached {len(unseen)} layer(s) to be quantized, e.g. "
                             f"{unseen[0]!r}: no activations to {purpose}")  # fmt: skip
        return {name: self.sums[name] / self.rows[name] for name in self.modules}


class _Stop(Exception):
    """Ends a calibration forward once the inputs it was run for are captured."""


class BlockChain:
    """Runs a model's stack of blocks (a ModuleList such as model.layers) one block at a time over calibration data,
    from each block's cached inputs, so sequential quantization (GPTQ) runs each block twice (statistics, then its
    quantized output for the next block) instead of the whole model once per block: 2L block runs instead of ~L².

    Its premise, that block i + 1 takes block i's output as its first input and every other input unchanged, holds
    for the transformers decoder stacks; it is checked once, on the first batch, against the model's own forward.
    `capture` returns None where it does not hold, and the caller runs the whole model instead."""

    def __init__(self, layers: nn.ModuleList, first: int, inputs: list):
        self.layers, self.index, self.inputs = layers, first, inputs

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, layers: nn.ModuleList, first: int, calibration) -> "BlockChain | None":
        inputs, check = [], None
        was_training = model.training
        model.eval()
        try:
            for index, batch in enumerate(_batches(calibration)):
                watched = [first] if index > 0 or first + 1 >= len(layers) else [first, first + 1]
                seen = {}

                def pre_hook_for(i):
                    def pre_hook(_module, args, kwargs):
                        seen[i] = (args, dict(kwargs))
                        if len(seen) == len(watched):
                            raise _Stop

                    return pre_hook

                handles = [layers[i].register_forward_pre_hook(pre_hook_for(i), with_kwargs=True) for i in watched]
                try:
                    _run(model, batch, index)
                except _Stop:
                    pass
                finally:
                    for handle in handles:
                        handle.remove()
                if first not in seen:
                    return None  # the model never called the block (or not from its forward)
                inputs.append(_without_cache(*seen[first]))
                if first + 1 in seen:
                    check = _without_cache(*seen[first + 1])
            chain = cls(layers, first, inputs)
            if check is not None:
                output = layers[first](*inputs[0][0], **inputs[0][1])
                if not _same_inputs(chain._next_inputs(inputs[0], output), check):
                    return None
            return chain
        finally:
            model.train(was_training)

    @torch.no_grad()
    def grams(self, modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
        """input_grams of the current block's `modules`, from the block's cached inputs."""
        with _InputStatistics(modules, _gram) as stats:
            self._outputs()
        return stats.means(GPTQ_PURPOSE)

    @torch.no_grad()
    def advance(self) -> None:
        """Run the current block (as it is now: quantized) and make its outputs the next block's inputs."""
        self.inputs = [self._next_inputs(i, o) for i, o in zip(self.inputs, self._outputs())]
        self.index += 1

    def _outputs(self) -> list:
        block = self.layers[self.index]
        was_training = block.training
        block.eval()
        try:
            return [block(*args, **kwargs) for args, kwargs in self.inputs]
        finally:
            block.train(was_training)

    @staticmethod
    def _next_inputs(inputs, output):
        args, kwargs = inputs
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def _is_kv_cache(value) -> bool:
    # transformers' Cache classes (the keyword is past_key_values, past_key_value or cache by version and model)
    return callable(getattr(value, "get_seq_length", None)) and callable(getattr(value, "update", None))


def _without_cache(args, kwargs):
    """The inputs without a KV cache: reused across block runs, a cache object would grow with every run and the
    attention would see its keys twice. A forward without generation needs none."""
    kwargs = {k: (None if _is_kv_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _same_inputs(a, b) -> bool:
    def same(x, y):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return x is y or x == y

    return same(a[0], b[0]) and same(a[1], b[1])
