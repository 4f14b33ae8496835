"""Shared sizes and tolerance helpers for the op and layer tests."""

import torch

# Awkward sizes on purpose: 1 (decode), 17 (odd, not a multiple of anything), 1025 (one past a
# power of two, so blocks straddle rows and the last block is partial).
SIZES = [1, 17, 1025]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]


def assert_close_to_exact(out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """The kernel may differ from the float64 truth by at most twice what the plain-PyTorch
    reference itself is off by at the same precision, plus one ulp of the largest output (the
    rounding of the final store, which the reference can happen to avoid on small cases)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    if exact.numel() == 0:
        return
    err = (out.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * exact.abs().max().item()
    assert err <= 2 * ref_err + ulp, f"{what}: error {err:.3g} vs reference error {ref_err:.3g} (+ulp {ulp:.3g})"
