"""The paper's figures as PNG, re-exported from ``common.diagnostic_plots``, shared with local
validation."""

from __future__ import annotations

from hrct_triage.common.diagnostic_plots import roc_plot, threshold_plot

__all__ = ["roc_plot", "threshold_plot"]
