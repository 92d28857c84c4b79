"""The PNGs of a local validation (ROC with its AUC, metrics along the threshold), drawn the same
way for the report files of ``hrct-triage validate`` and for the web page."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from hrct_triage.common.diagnostic_plots import roc_plot, threshold_plot
from hrct_triage.db.validation_cases import Cases


def validation_pngs(found: Cases, figures: dict[str, Any], *, title: str) -> dict[str, bytes]:
    """``{"roc.png": ..., "threshold.png": ...}``; only those the data allow (ROC needs both
    classes, the curve at least one study)."""
    truth = np.asarray([case.truth for case in found.cases], dtype=bool)
    scores = np.asarray([case.probability for case in found.cases], dtype=float)
    threshold = float(figures["threshold"])
    pngs: dict[str, bytes] = {}
    if figures["auc"] is not None:
        roc = io.BytesIO()
        roc_plot(roc, truth, scores, threshold=threshold, title=title, auc=figures["auc"])
        pngs["roc.png"] = roc.getvalue()
    if figures["curve"]:
        recommendation = figures["recommendation"]
        curve = io.BytesIO()
        threshold_plot(
            curve,
            figures["curve"],
            threshold=threshold,
            title=title,
            recommended=None if recommendation is None else float(recommendation["threshold"]),
        )
        pngs["threshold.png"] = curve.getvalue()
    return pngs
