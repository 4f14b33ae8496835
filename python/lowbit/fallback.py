"""The plain-PyTorch reference as every op's kernel on devices that have no native one.

Each reference is registered once, under the dispatcher's CompositeExplicitAutograd key (what
`torch.library.register_kernel(op, None, fn)` does). The dispatcher prefers a kernel registered for a
device's own key, so a native kernel (csrc/cpu, csrc/cuda) always wins where it exists, and any other
device (CUDA before its kernels are built, XPU, MPS, ...) runs the reference: a model moved there works,
more slowly, instead of failing with "no kernel", and a RuntimeWarning says so (once, naming the fix).
Autograd (ops.py) applies to both.
"""

from __future__ import annotations

import warnings

import torch

from . import reference
from ._native import build_info
from .formats import NestedState

# Device types lowbit may have native kernels for (csrc/<device>/): what native_devices() asks about.
KERNEL_DEVICES = ("cpu", "cuda")


def _linear_4bit(x, packed, absmax, blocksize, quant_type, shape, bias=None, *nested_args):
    # The op takes the nested state as four trailing arguments; the reference as one NestedState.
    return reference.linear_4bit(x, packed, absmax, blocksize, quant_type, shape, bias,
                                 NestedState.from_op_args(*nested_args))  # fmt: skip


REFERENCE_KERNELS = {
    "quantize_4bit": reference.quantize_4bit,
    "quantize_4bit_search": reference.quantize_4bit_search,
    "dequantize_4bit": reference.dequantize_4bit,
    "quantize_blockwise": reference.quantize_blockwise,
    "dequantize_blockwise": reference.dequantize_blockwise,
    "linear_4bit": _linear_4bit,
    "int8_vectorwise_quant": reference.int8_vectorwise_quant,
    "int8_mm": reference.int8_mm,
    "int8_linear": reference.int8_linear,
    "int8_weight_linear": reference.int8_weight_linear,
}


def native_devices(op: str) -> list[str]:
    """The device types among KERNEL_DEVICES with a native kernel for `lowbit::<op>`.

    Asks the dispatcher for a kernel registered under the device's own key; the reference, registered
    under an alias key, does not count. torch has no public query for this (torch.library.get_kernel
    returns the computed kernel, which the reference fills), hence the private call."""
    return [d for d in KERNEL_DEVICES if torch._C._dispatch_has_kernel_for_dispatch_key(f"lowbit::{op}", d.upper())]


# What the fallback has warned about: a device this build has no kernels for at all, or (device, op).
_warned: set = set()


def _warn_once(name: str, device: str) -> None:
    if device in _warned or (device, name) in _warned:  # before build_info(), which reads a file
        return
    built = device == "cpu" or (device == "cuda" and build_info()["cuda"])
    _warned.add((device, name) if built else device)
    if built:
        reason = f"lowbit has no native {device} kernel for {name} yet"
    elif device == "cuda":
        reason = ("this lowbit was built without CUDA kernels (lowbit.build_info()['cuda'] is False); rebuild with "
                  "them: LOWBIT_CUDA=ON pip install --no-build-isolation --force-reinstall --no-deps lowbit (a CUDA "
                  "torch and an nvcc for its CUDA version)")  # fmt: skip
    else:
        reason = f"lowbit has no kernels for {device} devices"
    warnings.warn(f"{reason}: its ops run the plain-PyTorch reference there, which is much slower", RuntimeWarning,
                  stacklevel=3)  # fmt: skip


def _kernel(name: str):
    def run(*args):
        _warn_once(name, next(a.device.type for a in args if isinstance(a, torch.Tensor)))
        return REFERENCE_KERNELS[name](*args)  # looked up per call, so a test can watch which calls reach it

    return run


# At import, so once per process (`lowbit/__init__.py` imports this module after the native library).
for _name in REFERENCE_KERNELS:
    torch.library.register_kernel(f"lowbit::{_name}", None, _kernel(_name))
