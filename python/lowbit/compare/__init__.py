"""The accuracy-tradeoff report: quantized configs measured against full precision.

    report = lowbit.compare()          # built-in SmolLM2, seven configs
    report.print(); report.save("out")  # terminal table; Markdown, JSON, CSV and PNG plots

`lowbit.compare` is this package and, called, `lowbit.compare.compare` (see its docstring): so both
`lowbit.compare(...)` and `import lowbit.compare.report` work.
"""

import sys
import types

from .api import compare
from .models import default_model_directory, export_model
from .presets import DEFAULT_CONFIGS, PRESETS
from .report import ConfigResult, LayerError, MixProposal, Report

__all__ = ["compare", "default_model_directory", "export_model", "Report", "ConfigResult", "LayerError", "MixProposal", "PRESETS", "DEFAULT_CONFIGS"]


class _CallablePackage(types.ModuleType):
    """The package, callable as its `compare` function."""

    def __call__(self, *args, **kwargs):
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
