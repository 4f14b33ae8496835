"""The reference fallback (lowbit.fallback): registered once, it runs exactly where a device has no
native kernel, and `native_devices` says which devices do."""

import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import op_cases

import lowbit
from lowbit import fallback

# Op name -> index of its first call in op_cases.
OPS = {op._qualified_op_name.split("::")[1]: i for i, (op, _) in reversed(list(enumerate(op_cases())))}


def test_every_op_has_a_reference_and_a_native_cpu_kernel():
    schemas = (Path(__file__).parents[1] / "csrc" / "ops.cpp").read_text()
    # Every op on tensors; cpu_isa() (a query of the CPU kernels' level, no tensors) has nothing to fall back to.
    tensor_ops = set(re.findall(r'm\.def\("(\w+)\((?=[^)]*Tensor)', schemas))
    assert set(OPS) == set(fallback.REFERENCE_KERNELS) == tensor_ops
    assert set(re.findall(r'm\.def\("(\w+)\(', schemas)) - tensor_ops == {"cpu_isa"}
    assert all("cpu" in fallback.native_devices(op) for op in OPS)


def test_a_build_without_cuda_kernels_reports_none():
    if lowbit.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels")
    assert not any("cuda" in fallback.native_devices(op) for op in OPS)


@pytest.mark.parametrize("op", sorted(OPS))
def test_reference_runs_exactly_where_no_native_kernel_exists(device, op, monkeypatch):
    calls = []
    reference = fallback.REFERENCE_KERNELS[op]
    monkeypatch.setitem(fallback.REFERENCE_KERNELS, op, lambda *args: calls.append(op) or reference(*args))
    overload, args = op_cases(device)[OPS[op]]
    overload(*args)
    assert bool(calls) == (device not in fallback.native_devices(op))


def test_dispatcher_prefers_a_device_kernel_over_the_default_one():
    # The rule lowbit.fallback relies on, shown on a scratch library: a kernel registered for all devices
    # (CompositeExplicitAutograd) serves a device only where that device has no kernel of its own.
    lib = torch.library.Library("lowbit_dispatch_rule", "DEF")
    for name in ("with_cpu_kernel", "default_only"):
        lib.define(f"{name}(Tensor x) -> Tensor")
        torch.library.register_kernel(f"lowbit_dispatch_rule::{name}", None, lambda x: x + 1, lib=lib)
    torch.library.register_kernel("lowbit_dispatch_rule::with_cpu_kernel", "cpu", lambda x: x + 2, lib=lib)
    x = torch.zeros(1)
    assert torch.ops.lowbit_dispatch_rule.with_cpu_kernel(x).item() == 2
    assert torch.ops.lowbit_dispatch_rule.default_only(x).item() == 1


def test_the_reference_fallback_warns_once_naming_the_reason(monkeypatch):
    monkeypatch.setattr(fallback, "_warned", set())
    A = torch.zeros(2, 8, dtype=torch.int8)
    run = fallback._kernel("int8_mm")  # what the dispatcher runs on a device without a native kernel
    with pytest.warns(RuntimeWarning, match="no native cpu kernel for int8_mm yet.*plain-PyTorch reference"):
        run(A, A)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(run(A, A), torch.zeros(2, 2, dtype=torch.int32))
    monkeypatch.setattr(fallback, "build_info", lambda: {"cuda": False})
    with pytest.warns(RuntimeWarning, match=r"built without CUDA kernels.*LOWBIT_CUDA=ON"):
        fallback._warn_once("linear_4bit", "cuda")
    with warnings.catch_warnings():  # once for the whole device, whichever op comes next
        warnings.simplefilter("error")
        fallback._warn_once("int8_linear", "cuda")
