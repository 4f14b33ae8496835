"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for lowbit layers: the quantized state shards like a weight.

FSDP2 shards parameters only, and a lowbit layer keeps its quantized state in buffers (so optimizers and
adapters leave it alone). `prepare_fsdp(model)`, called before `fully_shard`, turns the bulk of that state
(a 4-bit layer's packed bytes and block scales, an int8 layer's codes) into frozen parameters whose data is a
`ShardedState`: each rank then holds ~1/N of those bytes at rest, all-gathers them for forward and backward,
and frees them after, like any sharded weight.

Why a tensor subclass and not a plain frozen parameter: FSDP2's mixed precision (`MixedPrecisionPolicy(
param_dtype=...)`) casts every floating-point parameter before its all-gather, which would round float32
block scales to bfloat16 and turn packed bytes stored as a float dtype (`quant_storage`) into other bytes.
`ShardedState` uses FSDP2's all-gather extension points (`fsdp_pre_all_gather` / `fsdp_post_all_gather`) to
gather its bytes untouched, whatever the policy; after the all-gather a layer sees plain tensors of the
original dtype, so its kernels, torch.compile and the checkpoint format are those of the unsharded layer.

The small tables (the 16-entry code book, the 256-entry nested code, the nested scales, an int8 layer's row
scales: under 1% of the bytes) stay buffers, replicated on every rank."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map_only

from .nn import Linear4bit, Linear8bit, QuantizedLinear

# What prepare_fsdp shards, per layer class: the state that grows with in_features * out_features.
SHARDED_STATE = {Linear4bit: ("weight", "absmax"), Linear8bit: ("weight",)}

# The ops FSDP2 applies to a parameter while sharding it and building its DTensor: their results stay
# ShardedState (so the sharded local tensor keeps the all-gather hooks). Any other op sees the plain data.
_STRUCTURAL_OPS = {
    torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.chunk.default,
    torch.ops.aten.narrow.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.as_strided.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.zeros_like.default,
    torch.ops.aten.copy_.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.clone.default,
    torch.ops.aten._to_copy.default,
}


class ShardedState(torch.Tensor):
    """A frozen piece of a lowbit layer's quantized state that FSDP2 all-gathers byte for byte.

    It wraps a plain tensor (`data`) of the same shape and dtype. Under FSDP2 only its sharded local
    tensor is ever a ShardedState; the gathered, unsharded tensor a forward sees is plain."""

    data_: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=data.device, requires_grad=False,
        )  # fmt: skip

    def __init__(self, data: torch.Tensor):
        self.data_ = data

    def __repr__(self) -> str:
        return f"ShardedState({self.data_!r})"

    def __reduce_ex__(self, protocol):
        # Saved (torch.save, torch.distributed.checkpoint's shards) as the plain tensor it wraps: checkpoints
        # stay readable without lowbit, and load into prepared and unprepared layers alike.
        return self.data_.__reduce_ex__(protocol)

    def __tensor_flatten__(self):
        return ["data_"], None

    @staticmethod
    def __tensor_unflatten__(inner, metadata, outer_size, outer_stride):
        return ShardedState(inner["data_"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = tree_map_only(ShardedState, lambda t: t.data_, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func in _STRUCTURAL_OPS:
            return tree_map_only(torch.Tensor, ShardedState, out)
        return out

    # -- FSDP2's all-gather extension ----------------------------------------------------------------
    # The all-gather input is the local shard as it is: no cast to the policy's param_dtype. FSDP2 gathers
    # tensors of different dtypes as bytes, and hands each parameter back its own dtype.

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        data = self.data_
        padded_rows = math.ceil(outer_size[0] / mesh.size())  # every rank sends the same size
        if data.shape[0] < padded_rows:
            data = torch.cat([data, data.new_zeros((padded_rows - data.shape[0], *data.shape[1:]))])
        return (data,), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        # The gathered bytes are the unsharded tensor (FSDP2 trims the padding and frees and refills this
        # storage around each forward), so later all-gathers (out=...) have nothing left to do.
        if out is None:
            return all_gather_outputs[0], ()


def prepare_fsdp(model: nn.Module) -> nn.Module:
    """Make every lowbit layer in `model` shard its quantized state under FSDP2; call before `fully_shard`.

    The named state becomes frozen parameters (`requires_grad=False`) wrapping their tensors in
    ShardedState: names, dtypes, bytes and the state_dict stay the same. Idempotent; returns `model`."""
    for layer in model.modules():
        names = sharded_state_names(layer)
        if names and not layer.holds_weight:
            raise RuntimeError(f"{type(layer).__name__}({layer.in_features}, {layer.out_features}) holds no weight "
                               "yet: load or quantize the model before prepare_fsdp")  # fmt: skip
        for name in names:
            tensor = layer._buffers.pop(name, None)
            if tensor is not None:
                layer._parameters[name] = nn.Parameter(ShardedState(tensor), requires_grad=False)
    return model


def is_prepared(layer: QuantizedLinear) -> bool:
    """Whether prepare_fsdp turned this layer's quantized state into shardable parameters."""
    return any(name in layer._parameters for name in sharded_state_names(layer))


def sharded_state_names(module: nn.Module) -> tuple[str, ...]:
    """The names of the state prepare_fsdp shards in this module (empty for modules that are no lowbit layer)."""
    return next((names for cls, names in SHARDED_STATE.items() if isinstance(module, cls)), ())
