"""Local validation figures: the paper's Table 1 on the site's own labelled studies, the threshold
curve, and a site threshold for a target sensitivity, refused when too few studies back it.

The recommended threshold is the highest one at which the sensitivity on the site's studies still
reaches the target (a study is positive at probability >= threshold, as the worker decides), with
the Wilson 95% intervals of the sensitivity and specificity there and the studies they rest on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hrct_triage.common.diagnostic_metrics import (
    at_threshold,
    auc_interval,
    proportion_interval,
    roc_points,
    threshold_sweep,
)
from hrct_triage.db.validation_cases import Case, Cases

#: Labelled positives and negatives below which no threshold is recommended: with 20 positives
#: a sensitivity of 0.95 has a Wilson 95% interval about 0.76-0.99, already wider than useful.
DEFAULT_MIN_PER_CLASS = 20
DEFAULT_TARGET_SENSITIVITY = 0.95
CONFIDENCE = 0.95


@dataclass(frozen=True)
class ValidationOptions:
    """How to validate: the threshold (None: the recorded one if all studies agree, else
    ``configured_threshold``), the target sensitivity and the refusal limits."""

    configured_threshold: float
    threshold: float | None = None
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    min_positives: int = DEFAULT_MIN_PER_CLASS
    min_negatives: int = DEFAULT_MIN_PER_CLASS

    def __post_init__(self) -> None:
        for name in ("configured_threshold", "threshold", "target_sensitivity"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.min_positives < 1 or self.min_negatives < 1:
            raise ValueError("the minimum positives and negatives must be at least 1")


def decision_threshold(cases: Sequence[Case], options: ValidationOptions) -> tuple[float, str]:
    """The threshold the figures use, and where it came from: ``option``, ``recorded`` (every
    study was decided with it) or ``configured`` (none recorded, or they differ)."""
    if options.threshold is not None:
        return options.threshold, "option"
    recorded = {case.threshold for case in cases}
    only = next(iter(recorded)) if len(recorded) == 1 else None
    if only is not None:
        return float(only), "recorded"
    return options.configured_threshold, "configured"


def validation_figures(found: Cases, options: ValidationOptions) -> dict[str, Any]:
    """Every figure of the report as one JSON-ready document."""
    cases = found.cases
    truth = np.asarray([case.truth for case in cases], dtype=bool)
    scores = np.asarray([case.probability for case in cases], dtype=float)
    threshold, source = decision_threshold(cases, options)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    document: dict[str, Any] = {
        "studies": found.as_dict(),
        "positives": positives,
        "negatives": negatives,
        "threshold": threshold,
        "threshold_source": source,
        "target_sensitivity": options.target_sensitivity,
        "min_positives": options.min_positives,
        "min_negatives": options.min_negatives,
        "table": None,
        "auc": None,
        "roc": None,
        "curve": [],
        "recommendation": None,
        "recommendation_refused": None,
    }
    if cases:
        document["table"] = _table(truth, scores, threshold)
        document["curve"] = threshold_sweep(truth, scores)
    if positives and negatives:
        document["auc"] = auc_interval(truth, scores, confidence=CONFIDENCE).as_dict()
        fpr, tpr = roc_points(truth, scores)
        document["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    refusal = _refusal(positives, negatives, options)
    if refusal is None:
        document["recommendation"] = recommend_threshold(truth, scores, options.target_sensitivity)
    else:
        document["recommendation_refused"] = refusal
    return document


def _table(truth: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    table = at_threshold(truth, scores, threshold)
    return {
        **table.as_dict(),
        "sensitivity_ci": _interval(table.tp, table.positives),
        "specificity_ci": _interval(table.tn, table.negatives),
        "accuracy_ci": _interval(table.tp + table.tn, table.positives + table.negatives),
    }


def _interval(successes: int, trials: int) -> list[float] | None:
    found = proportion_interval(successes, trials, confidence=CONFIDENCE)
    return None if found is None else [found[0], found[1]]


def _refusal(positives: int, negatives: int, options: ValidationOptions) -> str | None:
    if positives >= options.min_positives and negatives >= options.min_negatives:
        return None
    return (
        f"too few labelled studies to recommend a threshold: {positives} positive(s) and "
        f"{negatives} negative(s), at least {options.min_positives} and "
        f"{options.min_negatives} needed"
    )


def recommend_threshold(
    truth: np.ndarray, scores: np.ndarray, target_sensitivity: float
) -> dict[str, Any]:
    """The highest threshold whose sensitivity reaches ``target_sensitivity``: the k-th highest
    probability among the positives, k the fewest true positives that reach the target."""
    positive_scores = np.sort(scores[truth])[::-1]
    needed = max(1, math.ceil(target_sensitivity * positive_scores.size - 1e-9))
    threshold = float(positive_scores[needed - 1])
    table = at_threshold(truth, scores, threshold)
    sensitivity_ci = _interval(table.tp, table.positives)
    return {
        "threshold": threshold,
        "threshold_ci": threshold_interval(positive_scores, needed),
        "target_sensitivity": target_sensitivity,
        "sensitivity": table.sensitivity,
        "sensitivity_ci": sensitivity_ci,
        "specificity": table.specificity,
        "specificity_ci": _interval(table.tn, table.negatives),
        "positives": table.positives,
        "negatives": table.negatives,
        "tp": table.tp,
        "fn": table.fn,
        "tn": table.tn,
        "fp": table.fp,
        # Whether the interval's lower end reaches the target too, i.e. whether the target is
        # met with 95% confidence rather than only on these studies.
        "target_within_ci": bool(sensitivity_ci and sensitivity_ci[0] >= target_sensitivity),
    }


# Resamples of the threshold's bootstrap interval; seeded, so a report is reproducible.
THRESHOLD_RESAMPLES = 2000


def threshold_interval(positive_scores: np.ndarray, needed: int) -> list[float]:
    """95% percentile-bootstrap interval of the recommended threshold: the positives are drawn
    again with replacement and the same order statistic (the ``needed``-th highest) is taken.

    Only the positives decide the threshold, so only they are resampled; the interval shows how
    far the threshold could move with another sample of the site's COVID-19 studies.
    """
    generator = np.random.default_rng(0)
    draws = generator.choice(
        positive_scores, size=(THRESHOLD_RESAMPLES, positive_scores.size), replace=True
    )
    # The needed-th highest of each resample is its (size - needed)-th lowest.
    taken = np.partition(draws, positive_scores.size - needed, axis=1)[
        :, positive_scores.size - needed
    ]
    low, high = np.quantile(taken, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return [float(low), float(high)]
