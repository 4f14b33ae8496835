"""Running models over the evaluation windows, prompts and timing loops.

Everything here takes a model and token ids and returns plain numbers or tensors;
what they mean for the report is decided in `api.py`.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch

from .data import Window
from .metrics import AgreementAccumulator, first_divergence, perplexity, squared_norm, token_nll
from .models import is_quantized, synchronize


@dataclass
class WindowOutput:
    logits: torch.Tensor  # [scored, vocab]: predictions for the window's scored targets
    hidden: torch.Tensor  # [scored, dim]: last hidden state at the same positions
    targets: torch.Tensor  # [scored]


def run_windows(model, ids: torch.Tensor, windows: list[Window], progress=None):
    """Yield one :class:`WindowOutput` per window; `ids` is 1-D on the model's device."""
    with torch.inference_mode():
        for w in windows:
            out = model(input_ids=ids[None, w.begin : w.end], output_hidden_states=True, use_cache=False)
            # logits at position p predict token p + 1, so the scored targets' predictions
            # sit one position before them.
            rows = slice(-(w.scored + 1), -1)
            yield WindowOutput(
                logits=out.logits[0, rows].float(),
                hidden=out.hidden_states[-1][0, rows].float(),
                targets=ids[w.end - w.scored : w.end],
            )
            if progress is not None:
                progress.update(1)


@dataclass
class Evaluation:
    perplexity: float
    nll_sum: float
    tokens: int


def outputs_nll(outputs) -> float:
    """The summed next-token NLL of window outputs (WindowOutput)."""
    return sum(float(token_nll(o.logits, o.targets).sum()) for o in outputs)


def evaluate_reference(model, ids, windows, progress=None) -> tuple[Evaluation, list[WindowOutput]]:
    """Perplexity of the full-precision model, keeping its outputs to compare against."""
    outputs = list(run_windows(model, ids, windows, progress))
    nll = outputs_nll(outputs)
    count = sum(len(o.targets) for o in outputs)
    return Evaluation(perplexity(nll, count), nll, count), outputs


def evaluate_against(model, ids, windows, reference: list[WindowOutput], progress=None):
    """Perplexity of `model` and its agreement with the reference outputs."""
    agreement = AgreementAccumulator()
    nll, count = 0.0, 0
    for out, ref in zip(run_windows(model, ids, windows, progress), reference):
        nll += float(token_nll(out.logits, out.targets).sum())
        count += len(out.targets)
        agreement.add(ref.logits, out.logits, ref.hidden, out.hidden)
    return Evaluation(perplexity(nll, count), nll, count), agreement.result()


@dataclass
class LayerSensitivity:
    rel_error: float  # ‖Q(x) − Wx‖ / ‖Wx‖
    est_nll: float  # first-order estimate of the change of the summed NLL were only this layer quantized


def layer_errors(full_model, quantized_model, ids, windows, progress=None) -> dict[str, LayerSensitivity]:
    """Each quantized layer's own error, fed full-precision activations, and its estimated cost.

    The full-precision model runs the windows; a hook hands each linear layer's input to
    its quantized twin as well. Feeding both the same input isolates the layer's own
    quantization error ΔY from the drift it inherits from the layers before it.

    A relative error alone does not say what the layer costs: an early down_proj that
    writes large activations into the residual stream hurts far more than a v_proj with
    the same relative error. So each ΔY is weighted by the gradient g of the summed
    next-token NLL with respect to that layer's output: Σ_positions g·ΔY is the first-order
    (Taylor) estimate of the NLL change that layer alone would cause. It is signed: an error
    may lower the NLL on this text, and measured alone such layers do. (Measured against quantizing
    each layer alone, on the built-in model's 210 layers: rank correlation 0.95 for NF4 and 0.87
    for FP4, where ½·Σ(g·ΔY)², the empirical-Fisher term used before, managed 0.18 and 0.21 and
    overestimated one FP4 layer 40-fold; see benchmarks/sensitivity_study.py.)
    """
    twins = {name: m for name, m in quantized_model.named_modules() if is_quantized(m)}
    if not twins:
        return {}
    full_modules = dict(full_model.named_modules())
    sums = {name: [0.0, 0.0, 0.0] for name in twins}  # [error², reference², estimated NLL]
    captured: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, output, ΔY) per call

    def hook_for(name):
        def hook(_module, inputs, output):
            with torch.no_grad():
                delta = twins[name](inputs[0]) - output
            sums[name][0] += squared_norm(delta)
            sums[name][1] += squared_norm(output.detach())
            captured.append((name, output, delta))

        return hook

    def detached_leaf(_module, _inputs, output):
        # Gradients are needed for activations only: start the graph at the embeddings so
        # it exists even for frozen models, and never touch parameters' .grad.
        return output.detach().requires_grad_()

    handles = [full_modules[name].register_forward_hook(hook_for(name)) for name in twins]
    handles.append(full_model.get_input_embeddings().register_forward_hook(detached_leaf))
    try:
        with torch.enable_grad():
            for w in windows:
                out = full_model(input_ids=ids[None, w.begin : w.end], use_cache=False)
                rows = slice(-(w.scored + 1), -1)
                loss = token_nll(out.logits[0, rows], ids[w.end - w.scored : w.end]).sum()
                grads = torch.autograd.grad(loss, [o for _, o, _ in captured], allow_unused=True)
                for (name, _, delta), grad in zip(captured, grads):
                    if grad is not None:
                        sums[name][2] += float((grad.double() * delta.double()).sum())
                captured.clear()
                if progress is not None:
                    progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: LayerSensitivity((err / max(ref, 1e-300)) ** 0.5, est) for name, (err, ref, est) in sums.items()
    }


def summed_nll(model, ids: torch.Tensor, windows: list[Window]) -> float:
    """The summed next-token NLL of `model` over the scored positions of `windows`."""
    return outputs_nll(run_windows(model, ids, windows))


def nll_with_layer_swapped(model, name: str, layer, ids: torch.Tensor, windows: list[Window]) -> float:
    """summed_nll with the module `name` of `model` replaced by `layer` (and put back afterwards): what
    quantizing that layer alone does, every other layer in full precision."""
    original = model.get_submodule(name)
    model.set_submodule(name, layer)
    try:
        return summed_nll(model, ids, windows)
    finally:
        model.set_submodule(name, original)


def greedy(model, ids: torch.Tensor, new_tokens: int, stop_ids=()) -> tuple[list[int], float, list[float]]:
    """Greedy decoding with the KV cache: (generated ids, prefill seconds, seconds per decode step)."""
    device = ids.device
    generated, steps = [], []
    # transformers renamed `past_key_values` to `cache` (5.x); accept either spelling.
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=ids[None], use_cache=True)
        synchronize(device)
        prefill = time.perf_counter() - start
        while True:
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            if len(generated) >= new_tokens or token in stop_ids:
                break
            start = time.perf_counter()
            next_ids = torch.tensor([[token]], device=device)
            out = model(input_ids=next_ids, use_cache=True, **{cache_name: out[cache_name]})
            synchronize(device)
            steps.append(time.perf_counter() - start)
    return generated, prefill, steps


@dataclass
class Speed:
    tokens: int  # prompt length of the prefill
    prefill_ms: float
    decode_ms_per_token: float
    # (slowest − fastest) / median over the runs: how far the runs disagreed (a busy machine shows here).
    prefill_spread: float = 0.0
    decode_spread: float = 0.0


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) if values and statistics.median(values) > 0 else 0.0


def measure_speed(model, ids: torch.Tensor, decode_steps: int, repeats: int = 3) -> Speed:
    """Median prefill time over `repeats` runs (after one warm-up) and median decode step time, each with the
    spread of the runs' own figures."""
    greedy(model, ids[:8], 2)  # warm-up: first-call allocations and kernel selection
    prefills, steps, run_steps = [], [], []
    for _ in range(repeats):
        _, prefill, step_times = greedy(model, ids, decode_steps + 1)
        prefills.append(prefill)
        steps.extend(step_times)
        run_steps.append(statistics.median(step_times))
    return Speed(len(ids), statistics.median(prefills) * 1e3, statistics.median(steps) * 1e3,
                 _spread(prefills), _spread(run_steps))  # fmt: skip


@dataclass
class Generation:
    prompt: str
    text: str
    tokens: list[int]
    diverges_at: int | None  # index of the first token that differs from full precision
    diverges_at_char: int | None  # where that token starts in `text`, for marking it


def encode_prompt(tokenizer, prompt: str, device) -> torch.Tensor:
    """Token ids for a prompt; chat models get their chat template, so they answer it."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(prompt).input_ids
    return torch.tensor(ids, device=device)


def generate(model, tokenizer, prompts, new_tokens, device, reference=None) -> list[Generation]:
    """Greedy generations; with `reference` (full precision's), each marks where it diverges."""
    stop = {tokenizer.eos_token_id} - {None}
    results = []
    for i, prompt in enumerate(prompts):
        tokens, _, _ = greedy(model, encode_prompt(tokenizer, prompt, device), new_tokens, stop)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        at = first_divergence(reference[i].tokens, tokens) if reference else None
        at_char = None
        if at is not None:
            # Decoding the prefix alone can differ in spacing from its span inside `text`.
            prefix = tokenizer.decode(tokens[:at], skip_special_tokens=True)
            at_char = len(prefix) if text.startswith(prefix) else 0
        results.append(Generation(prompt, text, tokens, at, at_char))
    return results
