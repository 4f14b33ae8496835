"""Loads lowbit's native operator library and says how it was built."""

from __future__ import annotations

import json
from pathlib import Path

import torch

_LIBRARY = "liblowbit_C.so"
_REBUILD = (
    "Rebuild lowbit against the installed torch: `pip install --no-build-isolation --force-reinstall --no-deps lowbit` "
    "(or `pip install --no-build-isolation -e .` in a source checkout)."
)


def _package_dirs() -> list[Path]:
    # An editable install splits the package: Python sources in the checkout, the built library in site-packages.
    return [Path(p) for p in __import__("lowbit").__path__]


def _find(name: str) -> Path:
    for d in _package_dirs():
        if (d / name).is_file():
            return d / name
    raise ImportError(f"lowbit's native library ({name}) was not found in {[str(d) for d in _package_dirs()]}. {_REBUILD}")


def build_info() -> dict:
    """How this lowbit was built: version, torch it was compiled against, CUDA kernels and archs, compiler."""
    info = json.loads(_find("build_info.json").read_text())
    info["cuda_archs"] = [a for a in info.get("cuda_archs", "").split(";") if a]
    info["library"] = str(_find(_LIBRARY))
    return info


def load() -> dict:
    info = build_info()
    built, running = info["torch"], torch.__version__
    if built != running:
        raise ImportError(f"lowbit was built against torch {built} but torch {running} is installed. {_REBUILD}")
    try:
        torch.ops.load_library(info["library"])
    except OSError as e:
        raise ImportError(f"lowbit's native library failed to load ({e}). {_REBUILD}") from e
    return info


# What each CPU kernel level runs, per op family (csrc/cpu/isa.h says how a level is chosen).
_CPU_PATHS = {
    "amx": "AVX-512 kernels; int8_weight_linear beyond 8 rows on AMX-BF16 tiles; LLM.int8() beyond 8 rows "
    "through at::_int_mm (AVX-512 VNNI)",
    "avx512": "AVX-512 kernels: fused 4-bit and int8 GEMVs, lowbit's panel GEMM beyond 15-16 rows; LLM.int8() beyond "
    "8 rows through at::_int_mm with AVX-512 VNNI, else lowbit's AVX2 int8 GEMM",
    "avx2": "AVX2 kernels: vpshufb-decoded NF4/FP4 GEMV, int8 GEMVs, lowbit's AVX2 panel GEMM beyond 15-16 rows, "
    "an exact vpmaddwd int8 GEMM for LLM.int8()",
    "portable": "portable C++ (auto-vectorized): GEMVs up to 8 rows, decode + BLAS GEMM beyond; LLM.int8() beyond "
    "8 rows through at::_int_mm",
    "neon": "aarch64 NEON kernels: tbl-decoded NF4/FP4 GEMV up to 8 rows, NEON decode + BLAS GEMM beyond; int8 GEMV; "
    "a tiled exact int8 GEMM (smull + sadalp) for LLM.int8()",
    "dotprod": "aarch64 NEON kernels as `neon`, with LLM.int8()'s int8 GEMM on sdot (FEAT_DotProd)",
}


def cpu_isa() -> dict:
    """The CPU kernels lowbit runs now: {"isa": amx | avx512 | avx2 | portable on x86, dotprod | neon | portable on
    Arm, "paths": what that level runs}.

    The best level this CPU has, or a lower one forced with the environment variable LOWBIT_CPU_ISA (read per call)."""
    isa = torch.ops.lowbit.cpu_isa()
    return {"isa": isa, "paths": _CPU_PATHS[isa]}
