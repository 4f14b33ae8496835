"""Typed wrappers over torch.ops.lowbit.*, and the one fake (shape-only) kernel that needs Python.
Autograd for the linear ops (gradients flow to the input and bias; quantized weights are frozen, as in
QLoRA) is in csrc/autograd.cpp: a Python autograd kernel would cost every call, grad mode or not.

Schemas live in csrc/ops.cpp; the native kernels validate their arguments (csrc/validate.cpp) and raise
ValueError / TypeError naming the problem, so these wrappers only supply defaults and convenient types.
On devices without native kernels the reference runs instead (lowbit.fallback), with lighter checks."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .formats import NESTED_BLOCKSIZE, SCALE_SEARCH_RATIOS, NestedState, dynamic_map, nested_op_args

_ops = torch.ops.lowbit


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of A (flattened row-major).

    Returns (packed uint8 [(numel + 1) // 2, 1], absmax float32 [ceil(numel / blocksize)])."""
    return _ops.quantize_4bit(A, blocksize, quant_type)


def quantize_4bit_search(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    ratios: Sequence[float] = SCALE_SEARCH_RATIOS,
    importance: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_4bit's format with a searched scale per block instead of the absmax: the first of
    absmax * r (r in `ratios`) and a least-squares refit that minimises the block's squared error, each
    element weighted by importance[i % K] (float32 [A.shape[-1]], e.g. the mean squared input activation
    of each input channel; None weighs all alike). Decodes with dequantize_4bit like any 4-bit weight."""
    return _ops.quantize_4bit_search(A, blocksize, quant_type, [float(r) for r in ratios], importance)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return _ops.dequantize_4bit(_as_bytes(packed), absmax, blocksize, quant_type, list(shape), dtype)


def quantize_blockwise(
    A: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization against `code` (default: the signed dynamic map)."""
    code = dynamic_map(A.device) if code is None else code
    return _ops.quantize_blockwise(A, code, blocksize)


def dequantize_blockwise(
    A: torch.Tensor,
    absmax: torch.Tensor,
    code: Optional[torch.Tensor] = None,
    blocksize: int = NESTED_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    code = dynamic_map(A.device) if code is None else code
    return _ops.dequantize_blockwise(A, absmax, code, blocksize, dtype)


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    bias: Optional[torch.Tensor] = None,
    nested: Optional[NestedState] = None,
) -> torch.Tensor:
    """x @ dequantize(W).T + bias, with W of `shape` [out_features, in_features] packed by quantize_4bit."""
    return _ops.linear_4bit(x, _as_bytes(packed), absmax, blocksize, quant_type, list(shape), bias,
                            *nested_op_args(nested))  # fmt: skip


def int8_vectorwise_quant(
    A: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization. Returns (int8 like A, float32 row absmax, int64 outlier columns)."""
    return _ops.int8_vectorwise_quant(A, threshold)


def int8_mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [N, K] -> int32 [M, N] (A @ B.T)."""
    return _ops.int8_mm(A, B)


def int8_linear(
    x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float = 0.0, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """LLM.int8() linear layer: int8 matmul plus the float outlier columns (threshold 0 disables them)."""
    return _ops.int8_linear(x, CB, SCB, threshold, bias)


def int8_weight_linear(
    x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x @ (CB * SCB / 127).T + bias: an int8 weight with activations kept in floating point (weight-only)."""
    return _ops.int8_weight_linear(x, CB, SCB, bias)


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    # Weights stored with another quant_storage dtype (for FSDP) are a view of the same bytes.
    return packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)


# -- fake kernels ------------------------------------------------------------------------------
# Every op but one has its fake (meta) kernel in C++ (csrc/meta.cpp), running the same validator as
# the device kernels. int8_vectorwise_quant's output size depends on the data, which only a Python
# fake kernel can express; it repeats the three argument checks of that op's validator.


@torch.library.register_fake("lowbit::int8_vectorwise_quant")
def _(A, threshold=0.0):
    op = "lowbit.int8_vectorwise_quant"
    if A.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: A must be float32, float16 or bfloat16, got {A.dtype}")
    if A.dim() < 1:
        raise ValueError(f"{op}: A must have at least one dimension")
    if not 0 <= threshold < math.inf:
        raise ValueError(f"{op}: threshold must be finite and >= 0, got {threshold}")
    rows = math.prod(A.shape[:-1])
    # How many columns hold outliers depends on the data.
    n_outliers = torch.library.get_ctx().new_dynamic_size() if threshold > 0 else 0
    return (
        A.new_empty(A.shape, dtype=torch.int8),
        A.new_empty((rows,), dtype=torch.float32),
        A.new_empty((n_outliers,), dtype=torch.int64),
    )
