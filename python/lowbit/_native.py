"""Loads lowbit's native operator library and says how it was built."""

from __future__ import annotations

import json
from pathlib import Path

import torch

_LIBRARY = "liblowbit_C.so"


def _rebuild_hint(built_torch: str | None = None) -> str:
    """The command that rebuilds lowbit from where pip installed it (PEP 610's direct_url.json says where): lowbit
    is not on PyPI, so `pip install lowbit` would find nothing."""
    source = None
    try:
        from importlib.metadata import distribution
        from urllib.parse import unquote, urlparse

        direct = json.loads(distribution("lowbit").read_text("direct_url.json") or "null")
        if direct and direct.get("url", "").startswith("file://"):
            path, editable = unquote(urlparse(direct["url"]).path), direct.get("dir_info", {}).get("editable", False)
            is_wheel = path.endswith(".whl")
            source = None if is_wheel else f"{'-e ' if editable else ''}{path}"
    except Exception:  # no metadata (a bare checkout on sys.path): the generic hint below
        pass
    back = f" (or reinstall torch {built_torch}, the one it was built against)" if built_torch else ""
    if source is None:
        return ("Rebuild lowbit against the installed torch from its source checkout: `pip install "
                f"--no-build-isolation --force-reinstall --no-deps .` in that checkout{back}.")  # fmt: skip
    return (f"Rebuild lowbit against the installed torch: "
            f"`pip install --no-build-isolation --force-reinstall --no-deps {source}`{back}.")  # fmt: skip


def _package_dirs() -> list[Path]:
    # An editable install splits the package: Python sources in the checkout, the built library in site-packages.
    return [Path(p) for p in __import__("lowbit").__path__]


def _find(name: str) -> Path:
    for d in _package_dirs():
        if (d / name).is_file():
            return d / name
    raise ImportError(
        f"lowbit's native library ({name}) was not found in {[str(d) for d in _package_dirs()]}. {_rebuild_hint()}"
    )


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
        raise ImportError(f"lowbit was built against torch {built} but torch {running} is installed. {_rebuild_hint(built)}")
    try:
        torch.ops.load_library(info["library"])
    except OSError as e:
        raise ImportError(f"lowbit's native library failed to load ({e}). {_rebuild_hint()}") from e
    return info


# What each CPU kernel level runs, per op family (csrc/cpu/isa.h says how a level is chosen).
_CPU_PATHS = {
    "amx": "AVX-512 kernels; int8_weight_linear beyond 8 rows on AMX-BF16 tiles; LLM.int8() beyond 8 rows "
    "through at::_int_mm (AVX-512 VNNI)",
    "avx512": "AVX-512 kernels: fused 4-bit and int8 GEMVs, lowbit's panel GEMM beyond 15-16 rows; LLM.int8() beyond "
    "8 rows through at::_int_mm with AVX-512 VNNI, else lowbit's AVX2 int8 GEMM",
    "avx2": "AVX2 kernels: vpshufb-decoded NF4/FP4 GEMV, int8 GEMVs, lowbit's AVX2 panel GEMM beyond 15-16 rows; "
    "LLM.int8() beyond 8 rows through at::_int_mm where the CPU has AVX-VNNI, else an exact vpmaddwd int8 GEMM",
    "portable": "portable C++ (auto-vectorized): GEMVs up to 8 rows, decode + BLAS GEMM beyond; LLM.int8() beyond "
    "8 rows through the BLAS float GEMM in exact K slices",
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
