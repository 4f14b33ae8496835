"""The accuracy-tradeoff report: quantized configs measured against full precision.

    report = lowbit.compare()          # built-in SmolLM2, six configs
    report.print(); report.save("out")  # terminal table; Markdown, JSON, CSV and PNG plots
"""

from .api import compare
from .presets import DEFAULT_CONFIGS, PRESETS
from .report import ConfigResult, LayerError, MixProposal, Report

__all__ = ["compare", "Report", "ConfigResult", "LayerError", "MixProposal", "PRESETS", "DEFAULT_CONFIGS"]
