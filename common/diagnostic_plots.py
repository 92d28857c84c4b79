"""The paper's figures as PNG: ROC with its AUC (Figure 3) and metrics along the threshold (4).

Built on ``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``: no global state, no
display needed, safe inside a worker or a test process. Each writes to a path (a report) or
to a binary stream (a web page).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hrct_triage.common.diagnostic_metrics import at_threshold, roc_points

__all__ = ["roc_plot", "threshold_plot"]

#: Where a figure goes: a file path, or a binary stream such as ``io.BytesIO``.
Target = TypeVar("Target", Path, IO[bytes])

_SIZE = (5.0, 5.0)  # inches; 100 dpi gives a 500 x 500 PNG, readable in a Markdown report
_DPI = 100


def roc_plot(
    path: Target,
    truth: npt.ArrayLike,
    probabilities: npt.ArrayLike,
    *,
    threshold: float,
    title: str,
    auc: Mapping[str, float | str | None] | None,
) -> Target:
    """ROC curve with the AUC (and CI) in the legend and the operating point at ``threshold``."""
    fpr, tpr = roc_points(truth, probabilities)
    figure = Figure(figsize=_SIZE, dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    label = "ROC"
    if auc is not None:
        label = f"AUC {float(auc['auc'] or 0.0):.3f}"
        low, high = auc["low"], auc["high"]
        if low is not None and high is not None:
            label += (
                f" ({float(auc['confidence'] or 0.0) * 100:.0f}% CI {float(low):.3f}-"
                f"{float(high):.3f}, {auc['method']})"
            )
    axes.plot(fpr, tpr, color="tab:blue", linewidth=2, label=label)
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    table = at_threshold(truth, probabilities, threshold)
    axes.plot(
        [1 - table.specificity],
        [table.sensitivity],
        "o",
        color="tab:red",
        label=f"threshold {threshold:g}",
    )
    axes.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title=title,
    )
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def threshold_plot(
    path: Target,
    sweep: Sequence[Mapping[str, float | int]],
    *,
    threshold: float,
    title: str,
    recommended: float | None = None,
) -> Target:
    """Sensitivity, specificity, accuracy and F1 against the threshold, chosen one marked (and
    a recommended one, dotted)."""
    steps = np.asarray([row["threshold"] for row in sweep], dtype=float)
    figure = Figure(figsize=_SIZE, dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name in ("sensitivity", "specificity", "accuracy", "f1"):
        axes.plot(
            steps,
            [float(row[name]) for row in sweep],
            linewidth=2,
            label="F1" if name == "f1" else name,
        )
    axes.axvline(threshold, color="grey", linestyle="--", linewidth=1)
    if recommended is not None:
        axes.axvline(
            recommended,
            color="tab:red",
            linestyle=":",
            linewidth=1.5,
            label=f"recommended {recommended:.3f}",
        )
    axes.set(
        xlim=(0, 1),
        ylim=(-0.01, 1.01),
        xlabel="threshold",
        ylabel="value",
        title=f"Metrics along the threshold, {title}",
    )
    axes.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
