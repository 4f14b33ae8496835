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
