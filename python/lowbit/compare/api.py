"""`compare()`: full precision against each quantization config, measured on one text."""

from __future__ import annotations

import datetime
import gc
import math
import platform
from dataclasses import dataclass, field

import torch
import transformers

from .._native import build_info, cpu_isa
from ..config import LowbitConfig
from ..nn import module_nbytes
from ..schemes import FULL_PRECISION, SCHEMES
from ._optional import require
from .data import CALIBRATION_SOURCE, DEFAULT_PROMPTS, Window, calibration_text, default_text, strided_windows
from .evaluate import (
    Evaluation, Generation, Speed, WindowOutput,
    evaluate_against, evaluate_reference, generate, layer_errors, measure_speed, nll_with_layer_swapped, outputs_nll,
)  # fmt: skip
from .mixed import propose
from .models import Footprint, LoadedModel, footprint, load_full_precision, quantized_copy, resolve_device
from .presets import PRESETS, describe, resolve
from .report import ConfigResult, LayerError, MixProposal, Report

# Defaults sized so the built-in SmolLM2 run over six configs takes a few minutes on a
# 2-core CPU; every figure in the report states the token count it was measured on.
DEFAULT_TOKENS = 1024
DEFAULT_CONTEXT = 512
DEFAULT_STRIDE = 256
DEFAULT_NEW_TOKENS = 24
SENSITIVITY_WINDOWS = 1
# Per config, the layers of largest estimated effect whose cost is also measured (each alone quantized): one
# evaluation of the sensitivity windows each.
MEASURED_LAYERS = 5
# What the activation-weighted scale search (the -aw configs) runs the full-precision model on first.
CALIBRATION_TOKENS = 512
# GPTQ (the -gptq configs) needs more: its per-layer Hessian XᵀX has rank at most the token count, and the built-in
# model's widest inputs have 1536 features. Measured 2026-12-05 (nf4-aw-gptq on the default text): 512 tokens
# +13.30% perplexity, 2048 tokens +7.48%.
GPTQ_CALIBRATION_TOKENS = 2048
SPEED_PROMPT_TOKENS = 128
SPEED_DECODE_STEPS = 16

_CONFIG_FIELDS = (
    "load_in_8bit", "load_in_4bit", "llm_int8_threshold", "llm_int8_weight_only", "llm_int8_skip_modules",
    "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "blocksize", "scale_search", "quantizer", "module_overrides",
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
    configs: None for int8, int8-wo, int8-t0, nf4, nf4-dq, nf4-aw, fp4; a comma-separated string of those
        names; a list of names and/or LowbitConfig objects; or a {name: LowbitConfig} dict.
    text: evaluation text (default: CPython's pydoc_data topics); its first `max_tokens`
        tokens are scored in windows of `context` tokens advancing by `stride`.
    prompts: prompts for greedy generations (default: three short questions); [] skips them.
    max_ppl_increase: a relative perplexity budget (0.01 = 1%); the report then proposes a
        mixed-precision config from the per-layer errors, measures it and says whether it met it.
    """
    named = resolve(configs)
    _check_numbers(max_tokens, context, stride, new_tokens, max_ppl_increase)
    if max_ppl_increase is not None and not sensitivity:
        raise ValueError("max_ppl_increase needs the per-layer errors: leave sensitivity=True")
    device = resolve_device(device)
    tqdm = require("tqdm", "the progress bar").tqdm if progress else None  # before the slow load: fail fast

    loaded = load_full_precision(model_or_path, tokenizer, device, progress)
    if text is None:
        text, text_source = default_text(), text_source or "CPython's pydoc_data.topics"
    ids, windows = _tokenize_into_windows(loaded, text, max_tokens, context, stride)
    calibrated = any(scheme.calibrated(config) for config in named.values() for scheme in _schemes_of(config))
    gptq = any(config.quantizer == "gptq" for config in named.values())
    bench = _Bench(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        device=loaded.device,
        text_source=text_source or "the given text",
        ids=ids,
        calibration=_tokenize(loaded, calibration_text(), GPTQ_CALIBRATION_TOKENS if gptq else CALIBRATION_TOKENS)
        if calibrated else None,
        context=context,
        stride=stride,
        windows=windows,
        # Per-layer errors need a backward pass; the first window's activations are enough
        # to rank layers and keep the run short.
        sensitivity_windows=windows[:SENSITIVITY_WINDOWS] if sensitivity else [],
        prompts=list(DEFAULT_PROMPTS if prompts is None else prompts),
        new_tokens=new_tokens,
        timing=timing,
    )
    if tqdm is not None:
        total = bench.steps_per_config * (len(named) + 1) - bench.per_layer_steps  # none for full precision
        bench.progress = tqdm(total=total, desc="full precision", unit="step")

    baseline = _measure_full_precision(bench, loaded.load_seconds)
    measured = [
        _measure_config(bench, baseline, name, PRESETS[name][0] if name in PRESETS else describe(config), config)
        for name, config in named.items()
    ]
    proposal, mixed = None, []
    if max_ppl_increase is not None:
        proposal, mixed = _propose_and_measure_mix(bench, baseline, measured, max_ppl_increase)
    bench.progress.close()
    return _assemble_report(loaded, bench, baseline, [baseline.result, *measured, *mixed], proposal)


class _NoProgress:
    """Stands in for the tqdm bar when progress is off (tqdm is an optional dependency)."""

    total = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Bench:
    """The full-precision model and what every config is measured on with it."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    text_source: str
    ids: torch.Tensor  # the evaluation tokens, on the model's device
    calibration: torch.Tensor | None  # the calibration tokens of the -aw configs' scale search, if any
    context: int
    stride: int
    windows: list[Window]
    sensitivity_windows: list[Window]  # where per-layer errors are measured; empty to skip them
    prompts: list[str]
    new_tokens: int
    timing: bool
    progress: object = field(default_factory=_NoProgress)  # a tqdm bar, or a stand-in doing nothing

    @property
    def sensitivity_tokens(self) -> int:
        return sum(w.scored for w in self.sensitivity_windows)

    @property
    def per_layer_steps(self) -> int:
        """Progress steps of one config's per-layer errors: its windows and its measured layers."""
        return len(self.sensitivity_windows) + MEASURED_LAYERS if self.sensitivity_windows else 0

    @property
    def steps_per_config(self) -> int:
        """Progress steps of one config: its windows, per-layer steps, prompts, timing and quantization."""
        return len(self.windows) + self.per_layer_steps + len(self.prompts) + int(self.timing) + 1

    def generate(self, model, reference=None) -> list[Generation]:
        """The prompts' greedy generations by `model`, marked where they diverge from `reference`'s."""
        return generate(model, self.tokenizer, self.prompts, self.new_tokens, self.device, reference=reference)

    def speed(self, model) -> Speed | None:
        """Prefill and decode times, or None when timing is off."""
        return measure_speed(model, self.ids[:SPEED_PROMPT_TOKENS], SPEED_DECODE_STEPS) if self.timing else None


@dataclass
class _Baseline:
    """Full precision's measurements, which every quantized config is compared with."""

    result: ConfigResult
    evaluation: Evaluation
    outputs: list[WindowOutput]  # per window: the logits and hidden states agreement is measured against
    footprint: Footprint
    sensitivity_nll: float  # summed NLL over the sensitivity windows (the first windows of the evaluation)


def _tokenize_into_windows(
    loaded: LoadedModel, text: str, max_tokens: int, context: int, stride: int
) -> tuple[torch.Tensor, list[Window]]:
    """The first `max_tokens` tokens of `text` on the model's device, and the strided windows scoring them."""
    ids = _tokenize(loaded, text, max_tokens)
    return ids, strided_windows(len(ids), context, stride)


def _tokenize(loaded: LoadedModel, text: str, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of `text`, on the model's device."""
    return torch.tensor(loaded.tokenizer(text).input_ids[:max_tokens], device=loaded.device)


def _schemes_of(config) -> list:
    """The schemes `config` may give a module: its default and those of its overrides."""
    names = {config.default_scheme, *config.module_overrides.values()} - {None, FULL_PRECISION}
    return [SCHEMES[name] for name in names]


def _measure_full_precision(bench: _Bench, load_seconds: float) -> _Baseline:
    """Perplexity, memory, speed and generations of the unquantized model, keeping its outputs."""
    model, progress = bench.model, bench.progress
    evaluation, outputs = evaluate_reference(model, bench.ids, bench.windows, progress)
    prints = footprint(model)
    result = ConfigResult(
        name="full",
        description=f"{str(next(model.parameters()).dtype).removeprefix('torch.')}, not quantized",
        config={},
        quantize_seconds=load_seconds,
        linear_bytes=prints.linear_bytes,
        total_bytes=prints.total_bytes,
        linear_ratio=1.0,
        total_ratio=1.0,
        perplexity=evaluation.perplexity,
        ppl_change=0.0,
        agreement=None,
        speed=bench.speed(model),
        generations=bench.generate(model),
    )
    progress.update(len(bench.prompts) + int(bench.timing) + 1)  # the windows counted themselves; +1 stands for the load
    return _Baseline(result, evaluation, outputs, prints, outputs_nll(outputs[: len(bench.sensitivity_windows)]))


def _measure_config(bench: _Bench, baseline: _Baseline, name: str, description: str, config) -> ConfigResult:
    """Quantize a copy of the model with `config` and measure it against full precision."""
    progress = bench.progress
    progress.set_description(f"{name}: quantize")
    calibration = None
    if any(scheme.calibrated(config) for scheme in _schemes_of(config)):
        calibration = bench.calibration if config.quantizer == "gptq" else bench.calibration[:CALIBRATION_TOKENS]
    quantized, seconds = quantized_copy(bench.model, config, calibration)
    progress.update()
    progress.set_description(f"{name}: perplexity")
    evaluation, agreement = evaluate_against(quantized, bench.ids, bench.windows, baseline.outputs, progress)
    layers = []
    if bench.sensitivity_windows:
        progress.set_description(f"{name}: per-layer")
        layers = _layer_errors(bench, baseline, quantized, config)
    progress.set_description(f"{name}: generate")
    generations = bench.generate(quantized, reference=baseline.result.generations)
    progress.update(len(bench.prompts))
    speed = None
    if bench.timing:
        progress.set_description(f"{name}: timing")
        speed = bench.speed(quantized)
        progress.update()
    prints = footprint(quantized)
    del quantized
    _free(bench.device)
    linear_ratio, total_ratio = prints.ratio(baseline.footprint)
    return ConfigResult(
        name=name,
        description=description,
        config=config_fields(config),
        quantize_seconds=seconds,
        linear_bytes=prints.linear_bytes,
        total_bytes=prints.total_bytes,
        linear_ratio=linear_ratio,
        total_ratio=total_ratio,
        perplexity=evaluation.perplexity,
        ppl_change=evaluation.perplexity / baseline.evaluation.perplexity - 1,
        agreement=agreement,
        speed=speed,
        generations=generations,
        layers=layers,
    )


def _layer_errors(bench: _Bench, baseline: _Baseline, quantized: torch.nn.Module, config) -> list[LayerError]:
    """Each quantized layer's own output error and estimated perplexity cost, on the sensitivity windows; for
    the MEASURED_LAYERS of largest estimated effect, the cost measured too (that layer alone quantized)."""
    errors = layer_errors(bench.model, quantized, bench.ids, bench.sensitivity_windows, bench.progress)
    full_modules, quantized_modules = dict(bench.model.named_modules()), dict(quantized.named_modules())
    tokens = bench.sensitivity_tokens
    layers = [
        LayerError(
            name=name,
            scheme=config.scheme_for(name),
            rel_error=error.rel_error,
            est_ppl_change=math.expm1(error.est_nll / tokens),
            bytes=module_nbytes(quantized_modules[name]),
            full_bytes=module_nbytes(full_modules[name]),
        )
        for name, error in errors.items()
    ]
    full_nll = baseline.sensitivity_nll
    # By the estimate's magnitude: a large first-order effect of either sign marks a large error, whose
    # second-order cost the estimate misses (FP4's last down_proj: estimated −1.7%, measured +7.9%).
    for layer in sorted(layers, key=lambda e: abs(e.est_ppl_change), reverse=True)[:MEASURED_LAYERS]:
        nll = nll_with_layer_swapped(bench.model, layer.name, quantized_modules[layer.name], bench.ids,
                                     bench.sensitivity_windows)  # fmt: skip
        layer.measured_ppl_change = math.expm1((nll - full_nll) / tokens)
        bench.progress.update()
    bench.progress.update(MEASURED_LAYERS - min(MEASURED_LAYERS, len(layers)))  # a model with fewer layers
    return layers


def _check_numbers(max_tokens, context, stride, new_tokens, max_ppl_increase) -> None:
    """Every number `compare` takes, checked before minutes of loading and measuring (a negative token count
    once meant the whole text, for hours)."""
    for name, value, least in (("max_tokens", max_tokens, 2), ("context", context, 2), ("stride", stride, 1),
                               ("new_tokens", new_tokens, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer ≥ {least}, got {value!r}")
    if stride > context:
        raise ValueError(f"stride ({stride}) must not exceed context ({context}): tokens between windows would go unscored")
    if max_ppl_increase is not None and not (isinstance(max_ppl_increase, (int, float)) and 0 <= max_ppl_increase < math.inf):
        raise ValueError(f"max_ppl_increase must be a finite fraction ≥ 0 (0.01 = 1%), got {max_ppl_increase!r}")


def _propose_and_measure_mix(
    bench: _Bench, baseline: _Baseline, measured: list[ConfigResult], budget: float
) -> tuple[MixProposal, list[ConfigResult]]:
    """Propose a precision mix meeting `budget` from the measured configs' per-layer errors, and
    measure it. Returns the proposal, with its verdict, and the mix's result: none when no layer
    needs promoting, since the proposal is then a config already measured."""
    proposal = propose(measured, budget)
    if proposal.promoted:
        bench.progress.total += bench.steps_per_config
        description = f"{proposal.base} with {proposal.promoted} layer(s) in {proposal.high}"
        mix = _measure_config(bench, baseline, "mixed", description, LowbitConfig(**proposal.config))
        new_results = [mix]
    else:  # a measured config already meets the budget and nothing smaller is predicted to: it is the proposal
        mix = next(r for r in measured if r.name == proposal.base)
        new_results = []
    proposal.result, proposal.measured_change = mix.name, mix.ppl_change
    return proposal, new_results


def _assemble_report(
    loaded: LoadedModel, bench: _Bench, baseline: _Baseline, results: list[ConfigResult], proposal: MixProposal | None
) -> Report:
    """The report: what was measured, on what and where, and the results with full precision first."""
    return Report(
        model=loaded.name,
        model_note=loaded.note,
        device=_device_name(bench.device),
        date=datetime.date.today().isoformat(),
        versions=_versions(),
        text_source=bench.text_source,
        tokens=baseline.evaluation.tokens,
        context=bench.context,
        stride=bench.stride,
        windows=len(bench.windows),
        sensitivity_tokens=bench.sensitivity_tokens,
        calibration=None if bench.calibration is None else (
            f"{min(len(bench.calibration), CALIBRATION_TOKENS)} tokens of {CALIBRATION_SOURCE}"
            + (f" ({len(bench.calibration)} for GPTQ)" if len(bench.calibration) > CALIBRATION_TOKENS else "")),
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
    return f"CPU ({torch.get_num_threads()} threads, lowbit {cpu_isa()['isa']} kernels)"


def _versions() -> dict[str, str]:
    return {
        "lowbit": build_info()["version"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
