"""Plain-PyTorch references for every lowbit op: readable, slow, and the yardstick the kernels are
tested against. Same signatures and outputs as lowbit.ops."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .formats import NESTED_BLOCKSIZE, NestedState, check_blocksize, code_4bit, dynamic_map

_MIN_ABSMAX = 1e-38


def _blocks(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """A flattened to float32 and zero-padded to [n_blocks, blocksize]; also returns numel."""
    flat = A.reshape(-1).float()
    n = flat.numel()
    return F.pad(flat, (0, -n % blocksize)).view(-1, blocksize), n


def _rows(A: torch.Tensor) -> torch.Tensor:
    """A as [rows, last dimension] (reshape(-1, K) cannot infer the rows when K is 0)."""
    return A.reshape(math.prod(A.shape[:-1]), A.shape[-1])


def _check_finite(A: torch.Tensor, op: str) -> None:
    if not torch.isfinite(A).all():
        raise ValueError(f"lowbit.{op}: input contains NaN or Inf")


def _sorted_code(quant_type: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, values, bounds): the code sorted stably (values = code[order]) and its 15 midpoints.
    The nearest code of x is order[bucketize(x, bounds)]; a value exactly between two codes goes to the lower one."""
    code = code_4bit(quant_type, device)
    order = torch.sort(code, stable=True).indices
    values = code[order]
    return order, values, (values[:-1] + values[1:]) / 2


def _pack_4bit(codes: torch.Tensor, zero_code: torch.Tensor) -> torch.Tensor:
    """Flat 4-bit codes, two per byte (high nibble first), an odd count padded with the zero code."""
    if codes.numel() % 2:
        codes = torch.cat([codes, zero_code.reshape(1)])
    codes = codes.to(torch.uint8)
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    _check_finite(A, "quantize_4bit")
    check_blocksize(blocksize)
    order, _, bounds = _sorted_code(quant_type, A.device)
    blocks, n = _blocks(A, blocksize)
    absmax = blocks.abs().amax(dim=1)
    denom = absmax.clamp(min=_MIN_ABSMAX).unsqueeze(1)
    scaled = blocks * (1.0 / denom)
    if n % blocksize:  # bitsandbytes divides in the final partial block; the rounding decides ties
        scaled[-1] = blocks[-1] / denom[-1]
    scaled = scaled.clamp(-1, 1).reshape(-1)[:n]
    zero = order[torch.bucketize(torch.zeros(1, device=A.device), bounds)]
    return _pack_4bit(order[torch.bucketize(scaled, bounds)], zero), absmax


_LANES = 16


def _lane_total(t: torch.Tensor) -> torch.Tensor:
    """Row sums of t [blocks, blocksize] in the kernels' order: element i into lane i % 16 (in order of i),
    then the 16 lanes added by halving (lane i + lane i + 8, then + 4, + 2, + 1). A fixed order makes the
    scale search's comparisons exact across devices."""
    chunks = t.view(t.shape[0], t.shape[1] // _LANES, _LANES)
    lanes = chunks[:, 0]
    for j in range(1, chunks.shape[1]):
        lanes = lanes + chunks[:, j]
    while lanes.shape[1] > 1:
        half = lanes.shape[1] // 2
        lanes = lanes[:, :half] + lanes[:, half:]
    return lanes[:, 0]


def quantize_4bit_search(
    A: torch.Tensor,
    blocksize: int,
    quant_type: str,
    ratios: Sequence[float],
    importance: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_4bit's format with a searched scale per block (see csrc/cpu/quantize_4bit_search.cpp).

    Each block tries s = absmax * r for r in `ratios` (nearest codes of clamp(v * (1 / s))), keeps the first
    smallest error sum(h * (v - s * c)^2), then tries the least-squares scale sum(h v c) / sum(h c^2) of the
    codes it kept. h is importance[i % K] (K = A.shape[-1]) or 1."""
    _check_finite(A, "quantize_4bit_search")
    check_blocksize(blocksize)
    if not 1 <= len(ratios) <= 64 or not all(0 < r <= 4 for r in ratios):
        raise ValueError(f"lowbit.quantize_4bit_search: ratios must be 1 to 64 values in (0, 4], got {list(ratios)}")
    order, values, bounds = _sorted_code(quant_type, A.device)
    blocks, n = _blocks(A, blocksize)
    if importance is None:
        h = torch.ones(n, device=A.device)
    else:
        if importance.dtype != torch.float32 or importance.shape != A.shape[-1:]:
            raise ValueError(f"lowbit.quantize_4bit_search: importance must be float32 [{A.shape[-1]}], got "
                             f"{importance.dtype} {list(importance.shape)}")  # fmt: skip
        if not (torch.isfinite(importance) & (importance >= 0)).all():
            raise ValueError("lowbit.quantize_4bit_search: importance must be finite and >= 0")
        h = importance.repeat(n // max(A.shape[-1], 1))
    h = F.pad(h, (0, blocks.numel() - n)).view_as(blocks)  # padding weighs nothing
    absmax = blocks.abs().amax(dim=1)

    def encode_error(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.bucketize((blocks * (1.0 / s).unsqueeze(1)).clamp(-1, 1), bounds)
        d = blocks - s.unsqueeze(1) * values[k]
        return k, _lane_total(h * (d * d))

    candidates = torch.tensor(list(ratios), dtype=torch.float32, device=A.device)
    best_s = (absmax * candidates[0]).clamp(min=_MIN_ABSMAX)
    best_k, best_e = encode_error(best_s)
    for r in candidates[1:]:
        s = (absmax * r).clamp(min=_MIN_ABSMAX)
        k, e = encode_error(s)
        better = e < best_e
        best_s, best_k, best_e = torch.where(better, s, best_s), torch.where(better[:, None], k, best_k), torch.where(better, e, best_e)
    c = values[best_k]
    num, den = _lane_total(h * (blocks * c)), _lane_total(h * (c * c))
    refit = torch.where((den > 0) & (num > 0), num / den, torch.zeros_like(num))
    fits = torch.isfinite(refit) & (refit >= _MIN_ABSMAX)
    k, e = encode_error(torch.where(fits, refit, best_s))
    better = fits & (e < best_e)
    best_s, best_k = torch.where(better, refit, best_s), torch.where(better[:, None], k, best_k)
    zero_block = absmax == 0
    zero_index = torch.bucketize(torch.zeros(1, device=A.device), bounds)
    best_k = torch.where(zero_block[:, None], zero_index, best_k)
    best_s = torch.where(zero_block, torch.zeros_like(best_s), best_s)
    return _pack_4bit(order[best_k.reshape(-1)[:n]], order[zero_index]), best_s


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    check_blocksize(blocksize)
    code = code_4bit(quant_type, packed.device)
    raw = packed.reshape(-1).view(torch.uint8)
    q = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1).long()
    n = 1
    for s in shape:
        n *= s
    if raw.numel() != (n + 1) // 2 or absmax.numel() != -(-n // blocksize):
        raise ValueError(f"lowbit.dequantize_4bit: {raw.numel()} packed bytes and {absmax.numel()} absmax values "
                         f"do not fit shape {list(shape)} with blocksize {blocksize}")
    values = F.pad(code[q[:n]], (0, -n % blocksize)).view(-1, blocksize) * absmax.unsqueeze(1)
    return values.reshape(-1)[:n].reshape(shape).to(dtype)


def quantize_blockwise(
    A: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_finite(A, "quantize_blockwise")
    code = dynamic_map(A.device) if code is None else code
    blocks, n = _blocks(A, blocksize)
    absmax = blocks.abs().amax(dim=1)
    x = (blocks / absmax.clamp(min=_MIN_ABSMAX).unsqueeze(1)).reshape(-1)[:n]
    # Nearest entry; on a tie the lower one wins.
    lo = (torch.searchsorted(code, x, right=True) - 1).clamp(0, code.numel() - 1)
    hi = (lo + 1).clamp(max=code.numel() - 1)
    q = torch.where((x - code[hi]).abs() < (x - code[lo]).abs(), hi, lo)
    return q.to(torch.uint8).reshape(A.shape), absmax


def dequantize_blockwise(
    A: torch.Tensor,
    absmax: torch.Tensor,
    code: Optional[torch.Tensor] = None,
    blocksize: int = NESTED_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    code = dynamic_map(A.device) if code is None else code
    values = code[A.reshape(-1).long()]
    n = values.numel()
    out = F.pad(values, (0, -n % blocksize)).view(-1, blocksize) * absmax.unsqueeze(1)
    return out.reshape(-1)[:n].reshape(A.shape).to(dtype)


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
    if x.shape[-1] != shape[1]:
        raise ValueError(f"lowbit.linear_4bit: x has {x.shape[-1]} features but the weight is {list(shape)}")
    if nested is not None:
        absmax = nested.decode(absmax)
    weight = dequantize_4bit(packed, absmax, blocksize, quant_type, shape, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def int8_vectorwise_quant(
    A: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = _rows(A).float()
    magnitude = rows.abs()
    is_outlier = magnitude >= threshold if threshold > 0 else torch.zeros_like(rows, dtype=torch.bool)
    outlier_cols = is_outlier.any(dim=0).nonzero().view(-1)
    magnitude = magnitude.masked_fill(is_outlier | magnitude.isnan(), 0)
    row_stats = magnitude.amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
    # (1 / absmax) * 127 in float32, as bitsandbytes computes it; a subnormal absmax overflows the
    # reciprocal, so such rows divide instead.
    scale = (row_stats.reciprocal() * 127.0).unsqueeze(1)
    scaled = torch.where(scale.isfinite(), rows * scale, rows / row_stats.unsqueeze(1) * 127.0)
    q = torch.round(torch.where(row_stats.unsqueeze(1) > 0, scaled, 0.0))
    q[:, outlier_cols] = 0
    # A NaN/Inf outside the outlier columns makes the row's result NaN, as it would in F.linear.
    poisoned = (~rows.isfinite() & ~is_outlier).any(dim=1)
    q[poisoned] = 0
    return q.to(torch.int8).reshape(A.shape), row_stats.masked_fill(poisoned, float("nan")), outlier_cols


def int8_mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    # A float32 sum of at most 1024 products of magnitude <= 127^2 stays below 2^24, so each chunk
    # of K is exact in float32 (fast on any device, unlike int64 or float64 on GPUs); the chunks add
    # up in int32, as the native kernels accumulate.
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.int32, device=A.device)
    for k in range(0, A.shape[1], 1024):
        out += (A[:, k : k + 1024].float() @ B[:, k : k + 1024].float().t()).to(torch.int32)
    return out


def int8_linear(
    x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float = 0.0, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    rows = _rows(x).float()
    q, row_stats, outlier_cols = int8_vectorwise_quant(rows, threshold)
    out = int8_mm(q, CB).float() * row_stats.unsqueeze(1) * SCB.unsqueeze(0) / (127.0 * 127.0)
    weight_cols = CB[:, outlier_cols].float() * (SCB / 127.0).unsqueeze(1)
    out = out + rows[:, outlier_cols] @ weight_cols.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], CB.shape[0])


def int8_weight_linear(
    x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    weight = (CB.float() * (SCB / 127.0).unsqueeze(1)).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
