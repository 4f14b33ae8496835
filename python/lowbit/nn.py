"""Quantized drop-in replacements for nn.Linear: Linear8bit (LLM.int8()) and Linear4bit (NF4/FP4).

Quantized weights and their float32 scales are buffers, not Parameters, so optimizers and adapters
(peft) leave them alone; the bias stays a Parameter. (lowbit.fsdp.prepare_fsdp makes the bulk of them frozen
Parameters, the only kind FSDP2 shards.) The packed 4-bit bytes may be stored as a float
dtype (quant_storage, for FSDP): a view of the same bytes, never a cast. state_dict keys and tensors
are those bitsandbytes writes, so checkpoints load both ways."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from . import ops
from .gptq import gptq_4bit, gptq_int8
from .formats import (
    ABSMAX,
    INT8_FORMAT,
    INT8_SCALES,
    MAX_INT8_K,
    NESTED_ABSMAX,
    NESTED_BLOCKSIZE,
    NESTED_QUANT_MAP,
    QUANT_MAP,
    QUANT_STATE,
    QUANT_TYPES,
    NestedState,
    QuantState4bit,
    check_blocksize,
    check_packed,
    check_quant_type,
    check_threshold,
    code_4bit,
    dtype_name,
    dynamic_map,
    named_errors,
    nested_offset,
    parse_dtype,
    parse_storage,
)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_hessian(hessian: torch.Tensor, in_features: int) -> None:
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (in_features, in_features):
        shape = list(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be the [{in_features}, {in_features}] mean xᵀx of the layer's inputs, got {shape}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian holds NaN or Inf (calibration activations overflowed?)")


def _autocast(x: torch.Tensor) -> torch.Tensor:
    """Under torch.autocast a layer computes in the autocast dtype, as nn.Linear does (the output then has it too)."""
    if not torch._C._is_any_autocast_enabled():  # the common case first: ~1 us of a small layer's call otherwise
        return x
    if x.device.type in ("cpu", "cuda") and x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x if x.dtype == dtype else x.to(dtype)
    return x


def _unit_scale(importance: torch.Tensor) -> torch.Tensor:
    """`importance` times the power of two that brings its largest value near 1: the scale search weighs errors
    relatively, so only the scale of its sums changes, exactly (a power of two), and importances near float32's
    limits (1e38) no longer overflow them."""
    peak = importance.abs().max() if importance.numel() else importance.new_zeros(())
    if not torch.isfinite(peak) or peak == 0:
        return importance
    return importance * torch.exp2(-torch.floor(torch.log2(peak)))


class QuantizedLinear(nn.Module):
    """What every lowbit layer shares: shapes, bias, state_dict plumbing, and dtype-safe `.to()`.

    A layer class (one per scheme in lowbit.schemes) states its bit width and the checkpoint names it
    reads and writes beside `weight` and `bias`, relative to the layer."""

    bits: int
    checkpoint_keys: tuple[str, ...] = ()
    # Buffers whose dtype is part of the format: `.to(dtype)`/`.half()` move them but never cast them.
    _format_buffers: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight_dtype = dtype or torch.get_default_dtype()  # the dtype of the weight before quantization
        _check_float_dtype(self.weight_dtype, "dtype (of the weight before quantization)")
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=self.weight_dtype)) if bias else None
        # Set by quantize_weight_ / load_quantized_: an empty layer (a loader's to fill) refuses to compute.
        self.holds_weight = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, importance: Optional[torch.Tensor] = None,
                    hessian: Optional[torch.Tensor] = None, **options: Any):  # fmt: skip
        """A quantized copy of `linear` (its weight is quantized; `linear` is left untouched). `importance`
        (one weight per input feature) is for layers with a scale search (Linear4bit(scale_search=True));
        `hessian` (the [in, in] mean xᵀx of calibration inputs) quantizes with GPTQ (lowbit.gptq)."""
        w = linear.weight
        _check_float_dtype(w.dtype, "the weight of the nn.Linear to quantize")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype,
                    **options)  # fmt: skip
        layer.quantize_weight_(w, importance, hessian=hessian)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    def _check_weight(self, weight: torch.Tensor) -> None:
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {list(weight.shape)}, expected [{self.out_features}, {self.in_features}]")
        _check_float_dtype(weight.dtype, "weight")
        if weight.device.type == "meta":
            raise ValueError("cannot quantize a weight on the meta device (it has no values)")

    def _check_holds_weight(self) -> None:
        # torch.func's jvp and grad cannot run the custom ops' C++ autograd (csrc/autograd.cpp; torch refuses
        # "C++ torch::autograd::Function with functorch transforms"): refuse both by the layer's name first.
        # vmap works (torch's per-sample fallback). Skipped under torch.compile, which does not trace it.
        if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
            from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

            kinds = {str(i.key()).rsplit(".", 1)[-1] for i in retrieve_all_functorch_interpreters()}
            if kinds & {"Jvp", "Grad"}:
                raise NotImplementedError(
                    f"{type(self).__name__} does not support torch.func.{'jvp' if 'Jvp' in kinds else 'grad'} (nor "
                    "jacfwd/jacrev/hessian): its kernels are custom ops whose backward torch.func cannot transform. "
                    "Use loss.backward() or torch.autograd.grad; torch.func.vmap works"
                )
        # A layer on meta computes no numbers; anywhere else an empty one would compute with garbage.
        if not self.holds_weight and self.weight.device.type != "meta":
            raise RuntimeError(
                f"{type(self).__name__}({self.in_features}, {self.out_features}) holds no weight: it was built empty "
                f"(for a loader to fill). Use {type(self).__name__}.from_linear(linear), quantize_weight_(weight) "
                "or load_state_dict(...) first"
            )

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        """Loaded tensors follow the layer's device, unless the layer is still on meta."""
        here = self.weight.device
        return t if here.type == "meta" else t.to(here)

    def _check_fits_prepared_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """State that lowbit.fsdp made parameters is filled in place (FSDP manages those objects), so a checkpoint
        must match it in shape and dtype; checked before a load changes anything."""
        for name, t in tensors.items():
            held = self._parameters.get(name)
            if held is not None and (held.shape != t.shape or held.dtype != t.dtype):
                raise ValueError(f"checkpoint '{name}' is {t.dtype} {list(t.shape)}, but this layer, prepared for FSDP "
                                 f"(lowbit.fsdp), holds {held.dtype} {list(held.shape)}: load it before prepare_fsdp")  # fmt: skip

    def _load_state(self, name: str, t: torch.Tensor) -> None:
        """Set a quantized-state tensor from a checkpoint (after _check_fits_prepared_state): a buffer follows
        the layer's device; a prepared (maybe sharded) parameter keeps its object and takes the values."""
        held = self._parameters.get(name)
        if held is None:
            setattr(self, name, self._place(t))
            return
        if _is_dtensor(held):  # sharded by FSDP2: this rank keeps its shard of the (whole, checked) tensor
            from torch.distributed.tensor import distribute_tensor

            t = distribute_tensor(t.to(held.device), held.device_mesh, held.placements, src_data_rank=None)
        with torch.no_grad():
            held.copy_(t)

    def _format_slots(self, name: str) -> dict:
        """Where a format tensor lives: a buffer, or a frozen parameter once lowbit.fsdp prepared the layer."""
        return self._parameters if name in self._parameters else self._buffers

    def _apply(self, fn, recurse=True):
        # (detached: a parameter's dtype cast may be applied to the same object, as `param.data = ...`)
        kept = {name: self._format_slots(name)[name].detach() for name in self._format_buffers
                if self._format_slots(name).get(name) is not None}  # fmt: skip
        super()._apply(fn, recurse)
        for name, before in kept.items():
            slots = self._format_slots(name)
            after = slots[name]
            if after.dtype != before.dtype:  # a dtype cast: undo it from the untouched original
                restored = before.to(after.device)
                slots[name] = nn.Parameter(restored, requires_grad=False) if slots is self._parameters else restored
        if any(self._format_slots(name)[name].device.type == "meta" for name in kept):
            # Moved to meta, the values are gone: a later to_empty() gives uninitialised memory, not this weight.
            self.holds_weight = False
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        # Shards (a sharded checkpoint loaded under FSDP2) are checked whole: one layer's state at a time.
        ours = {k[len(prefix):]: v.full_tensor() if _is_dtensor(v) else v
                for k, v in state_dict.items() if k.startswith(prefix)}  # fmt: skip
        bias = ours.pop("bias", None)
        if "weight" in ours:
            with named_errors(prefix[:-1] or type(self).__name__):  # the message is about one layer of many
                self.load_quantized_(ours)
        else:
            missing_keys.append(prefix + "weight")
        if self.bias is not None:
            if bias is None:
                missing_keys.append(prefix + "bias")
            elif bias.shape != self.bias.shape:
                raise ValueError(f"{prefix}bias has shape {list(bias.shape)}, expected [{self.out_features}]")
            elif self.bias.device.type == "meta":
                self.bias = nn.Parameter(bias.to(self.bias.dtype), requires_grad=self.bias.requires_grad)
            else:
                with torch.no_grad():  # in place: an optimizer holding the Parameter keeps it
                    self.bias.copy_(bias)
        elif bias is not None:
            unexpected_keys.append(prefix + "bias")
        unexpected_keys.extend(prefix + k for k in ours if k != "weight" and k not in self.checkpoint_keys)

    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint resolves each state_dict key attribute by attribute (`weight.absmax` as
        # layer.weight.absmax), and bitsandbytes' names (`weight.absmax`, `weight_format`) are no attributes.
        # Its hook for keys that are not attribute paths (StateDictOptions.dsd_fqn_modifiers) walks them
        # through an object that has every name instead.
        return {key.split(".")[0]: "_checkpoint_names" for key in ("weight", *self.checkpoint_keys)}

    class _AnyName:
        def __getattr__(self, name: str):
            if name.startswith("_"):  # not a checkpoint name (the walk probes for hooks such as _fqn_modifiers)
                raise AttributeError(name)
            return self

    _checkpoint_names = _AnyName()

    @classmethod
    def layout_problem(cls, keys: set[str]) -> Optional[str]:
        """What is missing from checkpoint names `keys` (relative to the layer, `weight` present) for
        this layer to load, or None."""
        return None

    @classmethod
    def declared_weight_shape(cls, entries: Mapping[str, Any]) -> tuple[int, ...]:
        """The [out_features, in_features] a layer's checkpoint entries declare, read before loading:
        `entries` maps the names `layout_problem` accepted to tensor shapes, except quant_state entries,
        which are the (small) tensors themselves."""
        raise NotImplementedError

    def _options_repr(self) -> str:
        return ""  # each layer adds its own format options

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._options_repr()}, {module_nbytes(self) / 2**10:.1f} KiB")


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")  # torch.distributed.tensor.DTensor, without importing torch.distributed


def _check_float_dtype(dtype, what: str) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {dtype}")


def quantized_weight_count(module: nn.Module) -> int:
    """Values held by the quantized weights of the lowbit layers in `module` (buffers, so not in parameters())."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, QuantizedLinear))


def quantized_state_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The lowbit layers' quantized state that lowbit.fsdp registered as (frozen) parameters: parameter counts
    leave them out and count quantized_weight_count instead."""
    return [t for m in module.modules() if isinstance(m, QuantizedLinear)
            for name, t in m._parameters.items() if name != "bias" and t is not None]  # fmt: skip


def module_nbytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (packed weights, scales, bias)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class Linear4bit(QuantizedLinear):
    """A linear layer whose weight is stored in 4 bits (NF4 or FP4), blockwise absmax-scaled.

    quant_type: "nf4" (best for normally distributed weights) or "fp4"; blocksize: elements per
    absmax scale (power of two, 32..4096); double_quant: store the absmax values themselves in
    8 bits (saves ~0.37 bits per weight at blocksize 64); compute_dtype: dtype of the matmul
    input/output (default: the input's); quant_storage: dtype the packed bytes are viewed as."""

    bits = 4
    _quant_state_keys = tuple(f"weight.{QUANT_STATE}{t}" for t in QUANT_TYPES)
    _nested_keys = (f"weight.{NESTED_ABSMAX}", f"weight.{NESTED_QUANT_MAP}")
    checkpoint_keys = (f"weight.{ABSMAX}", f"weight.{QUANT_MAP}", *_nested_keys, *_quant_state_keys)
    _format_buffers = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: Optional[torch.dtype] = None,
        quant_storage: torch.dtype = torch.uint8,
        scale_search: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.quant_type = check_quant_type(quant_type)
        self.blocksize = check_blocksize(blocksize)
        self.double_quant = bool(double_quant)
        self.scale_search = bool(scale_search)
        self.compute_dtype = None if compute_dtype is None else parse_dtype(compute_dtype)
        self.quant_storage = quant_storage = parse_storage(quant_storage)
        n = in_features * out_features
        n_bytes = (n + 1) // 2
        item = quant_storage.itemsize
        if n_bytes % item:
            raise ValueError(f"quant_storage {quant_storage} needs the packed size ({n_bytes} bytes) to be a multiple "
                             f"of {item}; use quant_storage=torch.uint8 for this shape")
        n_blocks = -(-n // self.blocksize)
        self.register_buffer("weight", torch.empty((n_bytes // item, 1), dtype=quant_storage, device=device))
        self.register_buffer("absmax", torch.empty(n_blocks, dtype=torch.uint8 if double_quant else torch.float32,
                                                   device=device))  # fmt: skip
        self.register_buffer("quant_map", code_4bit(quant_type, device))
        if double_quant:
            self.register_buffer("nested_absmax", torch.empty(-(-n_blocks // NESTED_BLOCKSIZE), dtype=torch.float32,
                                                              device=device))  # fmt: skip
            self.register_buffer("nested_quant_map", dynamic_map(device))
        self.nested_offset = 0.0

    def _nested(self) -> Optional[NestedState]:
        if not self.double_quant:
            return None
        return NestedState(self.nested_absmax, self.nested_quant_map, self.nested_offset, NESTED_BLOCKSIZE)

    def quant_state(self) -> QuantState4bit:
        return QuantState4bit(self.quant_type, self.blocksize, (self.out_features, self.in_features),
                              self.weight_dtype, self.absmax, self.quant_map, self._nested())  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_holds_weight()
        x = _autocast(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, Linear4bit expects {self.in_features}")
        dtype = self.compute_dtype or x.dtype
        # (dtype compared here, not left to .to(): two no-op dispatcher calls, 2 us, 3% of a small layer's call)
        out = ops.linear_4bit(x if x.dtype == dtype else x.to(dtype), self.weight, self.absmax, self.blocksize,
                              self.quant_type, (self.out_features, self.in_features), self.bias, self._nested())  # fmt: skip
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The weight in its original dtype (a full-size copy)."""
        state = self.quant_state()
        return ops.dequantize_4bit(self.weight, state.float_absmax(), self.blocksize, self.quant_type,
                                   state.shape, self.weight_dtype)  # fmt: skip

    @torch.no_grad()
    def quantize_weight_(self, weight: torch.Tensor, importance: Optional[torch.Tensor] = None,
                         hessian: Optional[torch.Tensor] = None) -> None:  # fmt: skip
        """Quantize a full-precision [out_features, in_features] weight into this layer (on its device).

        With scale_search, each block's scale is searched (ops.quantize_4bit_search) to minimise its squared
        error, each input feature's error weighted by `importance` [in_features] when given (e.g. the mean
        squared activation of that feature on calibration data, see lowbit.calibrate). With `hessian` ([in, in],
        the inputs' mean xᵀx) the codes are chosen by GPTQ (lowbit.gptq). The format is the same."""
        self._check_weight(weight)
        if importance is not None:
            if not self.scale_search:
                raise ValueError("importance weighs the scale search: build the layer with scale_search=True")
            importance = _unit_scale(importance.to(weight.device, torch.float32))
        if hessian is not None:
            _check_hessian(hessian, self.in_features)
            packed, absmax = gptq_4bit(weight, hessian.to(weight.device), self.blocksize, self.quant_type,
                                       search=self.scale_search, importance=importance)  # fmt: skip
        elif self.scale_search:
            packed, absmax = ops.quantize_4bit_search(weight, self.blocksize, self.quant_type, importance=importance)
        else:
            packed, absmax = ops.quantize_4bit(weight, self.blocksize, self.quant_type)
        if self.double_quant:
            offset = absmax.new_tensor(nested_offset(absmax))
            absmax, nested_absmax = ops.quantize_blockwise(absmax - offset, dynamic_map(absmax.device), NESTED_BLOCKSIZE)
            self.nested_absmax = nested_absmax
            self.nested_quant_map = dynamic_map(absmax.device)
            self.nested_offset = offset.item()
        # Other storage dtypes (for FSDP) view the same bytes, as bitsandbytes lays them out.
        self.weight = packed.view(-1).view(self.quant_storage).unsqueeze(1)
        self.absmax = absmax
        self.quant_map = code_4bit(self.quant_type, packed.device)
        self.weight_dtype = weight.dtype
        self.holds_weight = True

    @torch.no_grad()
    def load_quantized_(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load a pre-quantized weight from bitsandbytes-style tensors ("weight", "weight.absmax",
        "weight.quant_map", ["weight.nested_absmax", "weight.nested_quant_map"],
        "weight.quant_state.bitsandbytes__nf4|fp4"). Adopts the checkpoint's quant_type, blocksize and
        double quantization; raises ValueError naming what is missing or inconsistent."""
        if "weight" not in tensors:
            raise ValueError("checkpoint lacks 'weight' for a 4-bit layer")
        if not any(k.startswith("weight.quant_state.") for k in tensors):
            weight = tensors["weight"]
            kind = ("an 8-bit (Linear8bit) state dict: load it into a Linear8bit" if INT8_SCALES in tensors
                    else "a full-precision (nn.Linear) state dict: Linear4bit.from_linear(linear) or "
                    "quantize_weight_(state_dict['weight']) quantizes it" if weight.is_floating_point()
                    else "no 4-bit quant_state entry")  # fmt: skip
            raise ValueError(f"this is not a 4-bit checkpoint of a Linear4bit ('weight' is {weight.dtype} "
                             f"{list(weight.shape)}): {kind}")  # fmt: skip
        state = QuantState4bit.from_state_dict(tensors, "weight.")
        if state.shape != (self.out_features, self.in_features):
            raise ValueError(f"checkpoint weight has shape {list(state.shape)}, but this layer is "
                             f"[{self.out_features}, {self.in_features}]")  # fmt: skip
        packed = tensors["weight"]
        check_packed(packed, state.numel)
        self._check_fits_prepared_state({"weight": packed, "absmax": state.absmax})
        self.quant_type, self.blocksize, self.weight_dtype = state.quant_type, state.blocksize, state.dtype
        self.quant_storage = packed.dtype
        self._load_state("weight", packed)
        self._load_state("absmax", state.absmax)
        self.quant_map = self._place(state.code)
        self.double_quant = state.nested is not None
        if state.nested is not None:
            self.register_buffer("nested_absmax", self._place(state.nested.absmax))
            self.register_buffer("nested_quant_map", self._place(state.nested.code))
            self.nested_offset = state.nested.offset
        else:
            for name in ("nested_absmax", "nested_quant_map"):
                self._buffers.pop(name, None)
        self.holds_weight = True

    @classmethod
    def declared_weight_shape(cls, entries: Mapping[str, Any]) -> tuple[int, ...]:
        return QuantState4bit.declared_shape(entries, "weight.")

    @classmethod
    def layout_problem(cls, keys: set[str]) -> Optional[str]:
        missing = [k for k in cls.checkpoint_keys[:2] if k not in keys]
        if len(keys & set(cls._quant_state_keys)) != 1:
            missing.append("exactly one of " + " / ".join(cls._quant_state_keys))
        if len(keys & set(cls._nested_keys)) == 1:
            absent = next(k for k in cls._nested_keys if k not in keys)
            missing.append(f"{absent} (double quantization needs both nested tensors)")
        if missing:
            return f"the checkpoint's 4-bit quant state is incomplete: missing {', '.join(missing)}"
        return None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The scales are ordinary (persistent) buffers so every loader materializes and moves them,
        # but they are saved under bitsandbytes' names. A layer still on meta (a model being built)
        # lists only weight and bias: its other names are no attributes a loader could look up.
        for name in ("weight", "bias"):
            value = getattr(self, name)
            if value is not None:
                destination[prefix + name] = value if keep_vars else value.detach()
        if self.weight.device.type != "meta":
            for key, value in self.quant_state().to_state_dict(prefix + "weight.").items():
                destination[key] = value if keep_vars else value.detach()

    def _options_repr(self) -> str:
        dq = ", double_quant=True" if self.double_quant else ""
        cd = f", compute_dtype={dtype_name(self.compute_dtype)}" if self.compute_dtype else ""
        search = ", scale_search=True" if self.scale_search else ""
        return f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq}{cd}{search}"


def _check_weight_format(fmt) -> None:
    """bitsandbytes' int8 layout flag: absent, or 0 (row-major), as an int or a one-element integer tensor."""
    if fmt is None:
        return
    if isinstance(fmt, torch.Tensor):
        if fmt.numel() != 1 or fmt.is_floating_point() or fmt.is_complex() or fmt.dtype == torch.bool:
            raise ValueError(f"'{INT8_FORMAT}' must be one integer, got a {fmt.dtype} tensor of shape {list(fmt.shape)}")
        fmt = fmt.item() if fmt.device.type != "meta" else 0
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise TypeError(f"'{INT8_FORMAT}' must be an integer, got {type(fmt).__name__} {fmt!r}")
    if fmt != 0:
        raise ValueError(f"{INT8_FORMAT} {fmt} is not supported (only 0, row-major int8, is)")


class Linear8bit(QuantizedLinear):
    """A linear layer with an int8 weight: CB = round(W * 127 / SCB) per row (bitsandbytes' format).

    By default it computes LLM.int8(): activations quantized to int8 per row, and input columns holding any
    |x| >= threshold computed in floating point against the dequantized weight columns (the outlier
    decomposition; threshold 0 quantizes everything to int8). weight_only=True keeps the activations in
    floating point instead (W8A16: y = x @ (CB * SCB / 127).T): the same weights and checkpoint, only the
    weight's rounding error, and no threshold."""

    bits = 8
    checkpoint_keys = (INT8_SCALES, INT8_FORMAT)
    _format_buffers = ("SCB",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, threshold: float = 6.0,
                 weight_only: bool = False, device=None, dtype=None):  # fmt: skip
        super().__init__(in_features, out_features, bias, device, dtype)
        self.weight_only = bool(weight_only)
        if in_features > MAX_INT8_K and not self.weight_only:
            raise ValueError(f"in_features = {in_features} is more than the int8 matmul's int32 accumulator allows "
                             f"(max {MAX_INT8_K})")  # fmt: skip
        self.threshold = check_threshold(threshold)
        self.register_buffer("weight", torch.empty((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.empty(out_features, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_holds_weight()
        x = _autocast(x)
        if self.weight_only:
            return ops.int8_weight_linear(x, self.weight, self.SCB, self.bias)
        return ops.int8_linear(x, self.weight, self.SCB, self.threshold, self.bias)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        return (self.weight.float() * (self.SCB / 127.0).unsqueeze(1)).to(self.weight_dtype)

    @torch.no_grad()
    def quantize_weight_(self, weight: torch.Tensor, importance: Optional[torch.Tensor] = None,
                         hessian: Optional[torch.Tensor] = None) -> None:  # fmt: skip
        """Quantize a full-precision weight: rows scaled by their absmax; with `hessian` ([in, in], the inputs'
        mean xᵀx) the codes are chosen by GPTQ (lowbit.gptq) under the same row scales."""
        self._check_weight(weight)
        if importance is not None:
            raise ValueError("Linear8bit has no scale search to weigh: importance is for Linear4bit(scale_search=True)")
        # Rows are scaled from the float16-rounded weight, as bitsandbytes does: identical CB/SCB.
        half = weight.to(torch.float16)
        if not torch.isfinite(half).all():
            raise ValueError("weight has NaN/Inf values or values beyond float16 range (|w| > 65504); cannot quantize")
        self.weight, self.SCB, _ = ops.int8_vectorwise_quant(half, 0.0)
        if hessian is not None:
            _check_hessian(hessian, self.in_features)
            self.weight = gptq_int8(weight, hessian.to(weight.device), self.SCB)
        self.weight_dtype = weight.dtype
        self.holds_weight = True

    @torch.no_grad()
    def load_quantized_(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load "weight" (int8 CB), "SCB" (float32) and optionally "weight_format" (0 = row-major)."""
        if "weight" in tensors and INT8_SCALES not in tensors and tensors["weight"].is_floating_point():
            raise ValueError(f"this is a full-precision (nn.Linear) state dict ('weight' is {tensors['weight'].dtype}), "
                             "not an 8-bit checkpoint: Linear8bit.from_linear(linear) or "
                             "quantize_weight_(state_dict['weight']) quantizes it")  # fmt: skip
        if any(k.startswith("weight.quant_state.") for k in tensors):
            raise ValueError("this is a 4-bit (Linear4bit) state dict, not an 8-bit one: load it into a Linear4bit")
        for key in ("weight", INT8_SCALES):
            if key not in tensors:
                raise ValueError(f"checkpoint lacks '{key}' for an 8-bit layer")
        cb, scb = tensors["weight"], tensors[INT8_SCALES]
        _check_weight_format(tensors.get(INT8_FORMAT))
        if cb.dtype != torch.int8 or cb.shape != (self.out_features, self.in_features):
            raise ValueError(f"8-bit 'weight' must be int8 [{self.out_features}, {self.in_features}], got "
                             f"{cb.dtype} {list(cb.shape)} (a full-precision checkpoint needs quantize_weight_)")  # fmt: skip
        if scb.dtype != torch.float32 or scb.shape != (self.out_features,):
            raise ValueError(f"'SCB' must be float32 [{self.out_features}], got {scb.dtype} {list(scb.shape)}")
        if scb.device.type != "meta" and not (torch.isfinite(scb) & (scb >= 0)).all():
            raise ValueError("'SCB' holds NaN, Inf or negative row scales (corrupt checkpoint)")
        self._check_fits_prepared_state({"weight": cb, "SCB": scb})
        self._load_state("weight", cb)
        self._load_state("SCB", scb)
        self.holds_weight = True

    @classmethod
    def declared_weight_shape(cls, entries: Mapping[str, Any]) -> tuple[int, ...]:
        return tuple(entries["weight"])

    @classmethod
    def layout_problem(cls, keys: set[str]) -> Optional[str]:
        if INT8_SCALES not in keys:
            return f"the checkpoint holds no `{INT8_SCALES}` (int8 row scales) for this int8 layer"
        return None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, SCB and bias
        if self.weight.device.type != "meta":  # not an attribute: see Linear4bit._save_to_state_dict
            destination[prefix + INT8_FORMAT] = torch.tensor(0, dtype=torch.uint8)

    def _options_repr(self) -> str:
        return "weight_only=True" if self.weight_only else f"threshold={self.threshold}"
