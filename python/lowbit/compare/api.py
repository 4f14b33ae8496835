"""`compare()`: full precision against each quantization config, measured on one text."""

from __future__ import annotations

import datetime
import gc
import math
import platform

import torch

from . import configs as config_names
from ._optional import require
from .data import DEFAULT_PROMPTS, default_text, strided_windows
from .evaluate import evaluate_against, evaluate_reference, generate, layer_errors, measure_speed
from .mixed import propose
from ..nn import module_nbytes
from .models import footprint, load_full_precision, quantized_copy
from .report import ConfigResult, LayerError, Report

# Defaults sized so the built-in SmolLM2 run over five configs takes a few minutes on a
# 2-core CPU; every figure in the report states the token count it was measured on.
DEFAULT_TOKENS = 1024
DEFAULT_CONTEXT = 512
DEFAULT_STRIDE = 256
DEFAULT_NEW_TOKENS = 24
SENSITIVITY_WINDOWS = 1
SPEED_PROMPT_TOKENS = 128
SPEED_DECODE_STEPS = 16

_CONFIG_FIELDS = (
    "load_in_8bit", "load_in_4bit", "llm_int8_threshold", "llm_int8_skip_modules",
    "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "blocksize", "module_overrides",
)  # fmt: skip


def config_fields(config) -> dict:
    """The fields of a LowbitConfig that decide the numerics, as plain JSON-able values."""
    return {name: getattr(config, name) for name in _CONFIG_FIELDS if hasattr(config, name)}


def compare(
    model_or_path=None,
    configs=None,
    text: str | None = None,
    prompts=None,
    device=None,
    *,
    tokenizer=None,
    text_source: str | None = None,
    max_tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    stride: int = DEFAULT_STRIDE,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    sensitivity: bool = True,
    timing: bool = True,
    max_ppl_increase: float | None = None,
    progress: bool = True,
) -> Report:
    """Measure what each quantization config costs in accuracy and buys in memory.

    model_or_path: None for the built-in SmolLM2-135M-Instruct (weights from a Q4_1 GGUF),
        a model directory / .gguf file, or a loaded causal LM (pass `tokenizer` with it).
    configs: None for int8, int8-t0, nf4, nf4-dq, fp4; a comma-separated string of those
        names; a list of names and/or LowbitConfig objects; or a {name: LowbitConfig} dict.
    text: evaluation text (default: CPython's pydoc_data topics); its first `max_tokens`
        tokens are scored in windows of `context` tokens advancing by `stride`.
    prompts: prompts for greedy generations (default: three short questions); [] skips them.
    max_ppl_increase: a relative perplexity budget (0.01 = 1%); the report then proposes a
        mixed-precision config from the per-layer errors, measures it and says whether it met it.
    """
    named = config_names.resolve(configs)
    if max_ppl_increase is not None and not sensitivity:
        raise ValueError("max_ppl_increase needs the per-layer errors: leave sensitivity=True")
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    tqdm = require("tqdm", "the progress bar").tqdm if progress else None

    loaded = load_full_precision(model_or_path, tokenizer, device)
    model, tok = loaded.model, loaded.tokenizer
    dev = next(model.parameters()).device
    if text is None:
        text, text_source = default_text(), text_source or "CPython's pydoc_data.topics"
    ids = torch.tensor(tok(text).input_ids[:max_tokens], device=dev)
    windows = strided_windows(len(ids), context, stride)
    # Per-layer errors need a backward pass; the first window's activations are enough
    # to rank layers and keep the run short.
    sensitivity_windows = windows[:SENSITIVITY_WINDOWS]
    sensitivity_tokens = sum(w.scored for w in sensitivity_windows)

    per_config = len(windows) + (len(sensitivity_windows) if sensitivity else 0) + len(prompts) + (1 if timing else 0) + 1
    bar = tqdm(total=per_config * (len(named) + 1), desc="full precision", unit="step") if tqdm else None

    def step(n=1):
        if bar is not None:
            bar.update(n)

    def phase(name):
        if bar is not None:
            bar.set_description(name)

    reference, ref_outputs = evaluate_reference(model, ids, windows, bar)
    full_prints = footprint(model)
    full = ConfigResult(
        name="full",
        description=f"{str(next(model.parameters()).dtype).removeprefix('torch.')}, not quantized",
        config={},
        quantize_seconds=loaded.load_seconds,
        linear_bytes=full_prints.linear_bytes,
        total_bytes=full_prints.total_bytes,
        linear_ratio=1.0,
        total_ratio=1.0,
        perplexity=reference.perplexity,
        ppl_change=0.0,
        agreement=None,
        speed=measure_speed(model, ids[:SPEED_PROMPT_TOKENS], SPEED_DECODE_STEPS) if timing else None,
        generations=generate(model, tok, prompts, new_tokens, dev),
    )
    step(len(prompts) + int(timing) + 1)  # the windows counted themselves; +1 stands for the load

    def measure(name, description, config) -> ConfigResult:
        phase(f"{name}: quantize")
        quantized, seconds = quantized_copy(model, config)
        step()
        phase(f"{name}: perplexity")
        evaluation, agreement = evaluate_against(quantized, ids, windows, ref_outputs, bar)
        layers = []
        if sensitivity:
            phase(f"{name}: per-layer")
            errors = layer_errors(model, quantized, ids, sensitivity_windows, bar)
            full_modules, q_modules = dict(model.named_modules()), dict(quantized.named_modules())
            layers = [
                LayerError(
                    name=n,
                    scheme=config.scheme_for(n),
                    rel_error=e.rel_error,
                    est_ppl_change=math.expm1(e.est_nll / sensitivity_tokens),
                    bytes=module_nbytes(q_modules[n]),
                    full_bytes=module_nbytes(full_modules[n]),
                )
                for n, e in errors.items()
            ]
        phase(f"{name}: generate")
        generations = generate(quantized, tok, prompts, new_tokens, dev, reference=full.generations)
        step(len(prompts))
        speed = None
        if timing:
            phase(f"{name}: timing")
            speed = measure_speed(quantized, ids[:SPEED_PROMPT_TOKENS], SPEED_DECODE_STEPS)
            step()
        prints = footprint(quantized)
        del quantized
        _free(dev)
        return ConfigResult(
            name=name,
            description=description,
            config=config_fields(config),
            quantize_seconds=seconds,
            linear_bytes=prints.linear_bytes,
            total_bytes=prints.total_bytes,
            linear_ratio=prints.ratio(full_prints)[0],
            total_ratio=prints.ratio(full_prints)[1],
            perplexity=evaluation.perplexity,
            ppl_change=evaluation.perplexity / reference.perplexity - 1,
            agreement=agreement,
            speed=speed,
            generations=generations,
            layers=layers,
        )

    results = [full]
    for name, config in named.items():
        description = config_names.PRESETS[name][0] if name in config_names.PRESETS else config_names.describe(config)
        results.append(measure(name, description, config))

    proposal = None
    if max_ppl_increase is not None:
        proposal = propose(results[1:], max_ppl_increase)
        if proposal.promoted:
            if bar is not None:
                bar.total += per_config
            from lowbit import LowbitConfig

            high = next(iter(proposal.overrides.values()))
            mixed = measure(
                "mixed",
                f"{proposal.base} with {proposal.promoted} layer(s) in {'full precision' if high == 'none' else high}",
                LowbitConfig(**proposal.config),
            )
            results.append(mixed)
        else:  # the 4-bit base already fits: it is the proposal
            mixed = next(r for r in results if r.name == proposal.base)
        proposal.result, proposal.measured_change = mixed.name, mixed.ppl_change
    if bar is not None:
        bar.close()

    return Report(
        model=loaded.name,
        model_note=loaded.note,
        device=_device_name(dev),
        date=datetime.date.today().isoformat(),
        versions=_versions(),
        text_source=text_source or "the given text",
        tokens=reference.tokens,
        context=context,
        stride=stride,
        windows=len(windows),
        sensitivity_tokens=sensitivity_tokens if sensitivity else 0,
        results=results,
        proposal=proposal,
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    import transformers

    import lowbit

    return {
        "lowbit": getattr(lowbit, "__version__", "unknown"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
