"""Subject-level statistics as the paper reports them (its Tables 1 and 2 and Figure 4), for
the evaluation of a checkpoint and the local validation of a site alike (no torch here).

COVID-19 is the positive class. Sensitivity, specificity, accuracy and F1 come from the fourfold
table at a threshold (a study is positive when its probability is at or above it, as inference
decides). ROC and AUC come from scikit-learn, which the paper used too.

The 95% CI of the AUC is DeLong's by default (DeLong et al. 1988, in the fast midrank form of
Sun and Xu 2014): deterministic, standard in radiology (pROC's default), and valid with the few
dozen subjects a validation set has; the interval is AUC +/- z * SE, clipped to [0, 1]. A
stratified percentile bootstrap is the alternative (``method="bootstrap"``), seeded. Both give a
zero-width interval at AUC 1.0, where the data hold no information about the spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy.stats import binomtest, norm, rankdata
from sklearn.metrics import roc_auc_score, roc_curve

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

CiMethod = Literal["delong", "bootstrap"]
DEFAULT_BOOTSTRAP = 2000  # replicates: the percentile interval's ends move < 0.005 beyond this


@dataclass(frozen=True)
class Fourfold:
    """A fourfold (2 x 2) table against the truth and the rates derived from it."""

    tp: int
    fn: int
    tn: int
    fp: int

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.tn + self.fp

    @property
    def sensitivity(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def f1(self) -> float:
        """2TP / (2TP + FP + FN); 0 when there is nothing positive at all (as sklearn does)."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def as_dict(self) -> dict[str, float | int]:
        rates = {
            name: getattr(self, name)
            for name in ("sensitivity", "specificity", "accuracy", "precision", "f1")
        }
        return {**asdict(self), **rates}


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _binary(truth: Sequence[bool] | npt.ArrayLike) -> npt.NDArray[np.bool_]:
    return np.asarray(truth, dtype=bool)


def fourfold(truth: npt.ArrayLike, predicted: npt.ArrayLike) -> Fourfold:
    """Count TP, FN, TN, FP of ``predicted`` against ``truth`` (both boolean, COVID-19 True)."""
    t, p = _binary(truth), _binary(predicted)
    if t.shape != p.shape:
        raise ValueError(f"truth and predicted differ in length ({t.size} vs {p.size})")
    return Fourfold(
        tp=int((t & p).sum()),
        fn=int((t & ~p).sum()),
        tn=int((~t & ~p).sum()),
        fp=int((~t & p).sum()),
    )


def at_threshold(truth: npt.ArrayLike, probabilities: npt.ArrayLike, threshold: float) -> Fourfold:
    """The fourfold table of the decision ``probability >= threshold``."""
    return fourfold(truth, np.asarray(probabilities, dtype=float) >= threshold)


def proportion_interval(
    successes: int, trials: int, *, confidence: float = 0.95
) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / trials`` (scipy's ``binomtest``).

    Wilson rather than the normal approximation: with a few dozen trials and a proportion near
    1 (a sensitivity), the latter reaches past 1 or collapses to zero width. None without trials.
    """
    if trials == 0:
        return None
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    interval = binomtest(successes, trials).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def threshold_sweep(
    truth: npt.ArrayLike, probabilities: npt.ArrayLike, *, thresholds: npt.ArrayLike | None = None
) -> list[dict[str, float | int]]:
    """Sensitivity, specificity, accuracy and F1 along the threshold (the paper's Figure 4)."""
    steps = np.linspace(0.0, 1.0, 101) if thresholds is None else np.asarray(thresholds)
    return [
        {"threshold": float(t), **at_threshold(truth, probabilities, float(t)).as_dict()}
        for t in steps
    ]


@dataclass(frozen=True)
class AucInterval:
    """ROC AUC with a confidence interval, and how it was computed."""

    auc: float
    low: float | None  # None when the data cannot give an interval (fewer than 2 per class)
    high: float | None
    method: str
    confidence: float

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def _check_scores(
    truth: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
    t = _binary(truth)
    s = np.asarray(scores, dtype=np.float64)
    if t.shape != s.shape or t.ndim != 1:
        raise ValueError(f"truth and scores must be 1-D and equally long ({t.shape}, {s.shape})")
    if t.all() or not t.any():
        raise ValueError("an AUC needs at least one COVID-19 and one healthy subject")
    return t, s


def _midrank_auc(positives: npt.NDArray[np.float64], negatives: npt.NDArray[np.float64]) -> float:
    """Mann-Whitney AUC with ties counted half; equal to roc_auc_score, ~20x faster per call."""
    ranks = rankdata(np.concatenate([positives, negatives]))
    m, n = positives.size, negatives.size
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))


def delong_variance(truth: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[float, float]:
    """(AUC, variance of the AUC) by DeLong's structural components, via midranks."""
    t, s = _check_scores(truth, scores)
    positives, negatives = s[t], s[~t]
    m, n = positives.size, negatives.size
    ranks_all = rankdata(np.concatenate([positives, negatives]))
    ranks_pos, ranks_neg = rankdata(positives), rankdata(negatives)
    auc = (ranks_all[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    if m < 2 or n < 2:
        return float(auc), float("nan")  # a variance needs two subjects per class
    v_pos = (ranks_all[:m] - ranks_pos) / n  # share of negatives each positive outscores
    v_neg = 1.0 - (ranks_all[m:] - ranks_neg) / m  # share of positives outscoring each negative
    variance = np.var(v_pos, ddof=1) / m + np.var(v_neg, ddof=1) / n
    return float(auc), float(variance)


def auc_interval(
    truth: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    method: CiMethod = "delong",
    confidence: float = 0.95,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> AucInterval:
    """ROC AUC (scikit-learn) and its ``confidence`` interval by DeLong or by bootstrap."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    t, s = _check_scores(truth, scores)
    auc = float(roc_auc_score(t, s))
    if method == "delong":
        _, variance = delong_variance(t, s)
        if math.isnan(variance):
            return AucInterval(auc, None, None, method, confidence)
        half = float(norm.ppf(0.5 + confidence / 2.0)) * math.sqrt(variance)
        low, high = max(0.0, auc - half), min(1.0, auc + half)
    elif method == "bootstrap":
        low, high = _bootstrap(t, s, confidence=confidence, n=n_bootstrap, seed=seed)
    else:
        raise ValueError(f"method must be 'delong' or 'bootstrap', got {method!r}")
    return AucInterval(
        auc=auc, low=float(low), high=float(high), method=method, confidence=confidence
    )


def _bootstrap(
    t: npt.NDArray[np.bool_], s: npt.NDArray[np.float64], *, confidence: float, n: int, seed: int
) -> tuple[float, float]:
    """Percentile interval over resamples drawn within each class, so every AUC is defined."""
    if n < 100:
        raise ValueError(f"n_bootstrap must be >= 100, got {n}")
    rng = np.random.default_rng(seed)
    positives, negatives = s[t], s[~t]
    aucs = np.empty(n)
    for i in range(n):
        aucs[i] = _midrank_auc(
            rng.choice(positives, positives.size), rng.choice(negatives, negatives.size)
        )
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(aucs, [tail, 100.0 - tail])
    return float(low), float(high)


def roc_points(
    truth: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(false positive rate, true positive rate) of the ROC curve, from scikit-learn."""
    t, s = _check_scores(truth, scores)
    fpr, tpr, _ = roc_curve(t, s)
    return np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
