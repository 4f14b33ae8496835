"""Optional dependencies of the report, each named with the pip extra that brings it."""

from __future__ import annotations

import importlib

EXTRA = "compare"


def require(module: str, purpose: str):
    """Import `module` or raise an ImportError saying which extra installs it and why it is needed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ImportError(
            f"{purpose} needs {package}, which is not installed: pip install 'lowbit[{EXTRA}]'"
        ) from None
