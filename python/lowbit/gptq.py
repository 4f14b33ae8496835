"""Error-compensating quantization (GPTQ, Frantar et al. 2022) into lowbit's plain formats.

For a linear layer y = x Wᵀ and calibration inputs X, GPTQ quantizes W one input column at a time and moves each
column's rounding error onto the columns not yet quantized, in the direction that least changes the layer's
output on X: the update is the error times a row of the inverse of H = XᵀX. The result is still codes and scales
in bitsandbytes' layout (4-bit: codes and one absmax per block of `blocksize` consecutive input columns of a row;
int8: codes and one absmax per row), so any bitsandbytes-compatible loader reads it; only choosing the codes cost
calibration.

Choices, after the paper and its reference implementation:
  * H's diagonal is damped by 1% of its mean (a near-singular H would make the updates blow up); inputs that never
    fire (a zero diagonal) get a unit diagonal and a zero weight column, as they cost nothing whatever the weight.
  * The upper Cholesky factor of H⁻¹ gives each column's update row directly (the paper's reformulation).
  * Columns are processed in batches of 128 (a multiple of every blocksize up to 128, so a 4-bit block never spans
    two batches): within a batch rank-1 updates, to the columns after it one GEMM ("lazy batch updates").
  * A 4-bit block's scale is fixed when its first column is reached, from the error-updated weights of the block:
    their absmax, or (with a scale search) lowbit's scale search over them (ops.quantize_4bit_search), each input
    column weighted by its mean squared activation, the Hessian's diagonal, for the activation-aware search. No
    act-order: bitsandbytes' blocks are runs of consecutive input columns, and reordering the columns would change
    which share a scale.
  * int8 rows keep the scale plain quantization gives them (the float16-rounded row absmax, as bitsandbytes).
"""

from __future__ import annotations

import torch

from . import ops
from .formats import code_4bit

DAMPENING = 0.01
BATCH_COLUMNS = 128


def _inverse_factor(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of the damped H⁻¹ (float32), zeroing `weight`'s columns of dead inputs."""
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    weight[:, dead] = 0.0
    H += DAMPENING * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)


def _run_columns(weight: torch.Tensor, factor: torch.Tensor, quantize_column) -> None:
    """The GPTQ sweep: quantize_column(k, column) returns column k's dequantized values (and records its codes);
    its error is spread onto the columns after it."""
    K = weight.shape[1]
    for i1 in range(0, K, BATCH_COLUMNS):
        i2 = min(i1 + BATCH_COLUMNS, K)
        W1 = weight[:, i1:i2].clone()
        errors = torch.empty_like(W1)
        F1 = factor[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            error = (w - quantize_column(i1 + i, w, W1[:, i:])) / F1[i, i]
            W1[:, i:] -= error.unsqueeze(1) * F1[i, i:].unsqueeze(0)
            errors[:, i] = error
        weight[:, i2:] -= errors @ factor[i1:i2, i2:]


@torch.no_grad()
def gptq_4bit(weight: torch.Tensor, hessian: torch.Tensor, blocksize: int, quant_type: str, search: bool = False,
              importance: torch.Tensor | None = None):  # fmt: skip
    """(packed codes [N*K/2, 1] uint8, absmax [N*K/blocksize] float32) for the [N, K] `weight`, K a multiple of
    `blocksize`, `hessian` the [K, K] XᵀX of its calibration inputs. `search`: each block's scale by the scale
    search, its columns weighted by `importance` [K] (None: alike)."""
    N, K = weight.shape
    if K % blocksize or BATCH_COLUMNS % blocksize:
        raise ValueError(f"GPTQ needs in_features ({K}) to be a multiple of the blocksize ({blocksize}), and the "
                         f"blocksize to divide {BATCH_COLUMNS}: a block must not span two rows or two batches")  # fmt: skip
    W = weight.to(torch.float32).clone()
    factor = _inverse_factor(hessian, W)
    code = code_4bit(quant_type, W.device)
    order = torch.sort(code, stable=True).indices
    values = code[order]
    bounds = (values[:-1] + values[1:]) / 2
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    absmax = torch.empty(N, K // blocksize, dtype=torch.float32, device=W.device)
    inverse = torch.empty(N, dtype=torch.float32, device=W.device)

    def quantize_column(k: int, w: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        if k % blocksize == 0:  # the block's scale, from its error-updated weights
            block = rest[:, :blocksize]
            if search:
                block_importance = None if importance is None else importance[k : k + blocksize].contiguous()
                scale = ops.quantize_4bit_search(block.contiguous(), blocksize, quant_type, importance=block_importance)[1]
            else:
                scale = block.abs().amax(1)
            absmax[:, k // blocksize] = scale
            inverse.copy_(1.0 / scale.clamp(min=torch.finfo(torch.float32).tiny))
        c = order[torch.bucketize((w * inverse).clamp(-1, 1), bounds)]
        codes[:, k] = c.to(torch.uint8)
        return code[c] * absmax[:, k // blocksize]

    _run_columns(W, factor, quantize_column)
    flat = codes.reshape(-1)
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1), absmax.reshape(-1)


@torch.no_grad()
def gptq_int8(weight: torch.Tensor, hessian: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] for `weight` with its rows' absmax `scb` fixed (values CB · SCB / 127)."""
    W = weight.to(torch.float32).clone()
    factor = _inverse_factor(hessian, W)
    step = (scb.to(torch.float32) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.empty(W.shape, dtype=torch.int8, device=W.device)

    def quantize_column(k: int, w: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        q = torch.round(w / step).clamp(-127, 127)
        codes[:, k] = q.to(torch.int8)
        return q * step

    _run_columns(W, factor, quantize_column)
    return codes
