"""The subject-level statistics, re-exported from ``common.diagnostic_metrics``, where they live
so that local validation (``hrct-triage validate``, the web page) computes the same figures
without importing the worker."""

from __future__ import annotations

from hrct_triage.common.diagnostic_metrics import (
    DEFAULT_BOOTSTRAP,
    AucInterval,
    CiMethod,
    Fourfold,
    at_threshold,
    auc_interval,
    delong_variance,
    fourfold,
    proportion_interval,
    roc_points,
    threshold_sweep,
)

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "AucInterval",
    "CiMethod",
    "Fourfold",
    "at_threshold",
    "auc_interval",
    "delong_variance",
    "fourfold",
    "proportion_interval",
    "roc_points",
    "threshold_sweep",
]
