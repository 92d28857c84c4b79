"""The domain guard: how far a study's input lies from the inputs the checkpoint was trained on, so
that a result on input the model never saw is labelled as such instead of trusted.

A checkpoint's reference (``<checkpoint without suffix>.domain.json``, written by
``hrct-triage domain-reference``) describes its training inputs by two per-study vectors:

* the network's view: the mean over the kept lung slices of the global-average-pooled
  DenseNet-121 features (1024-d), projected onto the reference's first ``k`` principal axes, plus
  the length of the part those axes leave out;
* the scanner's view: the input statistics ``INPUT_KEYS`` (lung HU percentiles, noise, lung
  share of the body and of the slices, head-to-foot lung extent;
  ``worker.method.input_statistics``).

Each gets a Mahalanobis distance to the reference studies, with a Ledoit-Wolf shrinkage
covariance (few studies, many dimensions). Each distance is divided by its cut-off, the 99th
percentile of the reference studies' own leave-one-out distances (each study measured against a
model fitted without it), and the domain score is the larger of the two quotients: 1.0 is the
cut-off, and a study is in the domain when its score is at most 1. A study far out in either view
is out; neither view can vouch for the other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

from hrct_triage.common.errors import AnalysisError

__all__ = [
    "CUTOFF_QUANTILE",
    "INPUT_KEYS",
    "DomainReference",
    "DomainReferenceError",
    "build_reference",
    "load_reference",
    "reference_path",
]

log = logging.getLogger(__name__)

FORMAT = "hrct-triage-domain-reference/1"
CUTOFF_QUANTILE = 0.99
INPUT_KEYS = (
    "lung_hu_p10",
    "lung_hu_p50",
    "lung_hu_p90",
    "noise_hu",
    "lung_fraction",
    "lung_slice_share",
    "lung_extent_mm",
)
DEFAULT_COMPONENTS = 8


class DomainReferenceError(AnalysisError):
    """A domain reference file is unreadable or malformed."""


@dataclass(frozen=True)
class _Gauge:
    """One view: centre, projection (None: identity), inverse shrunk covariance and cut-off."""

    mean: npt.NDArray[np.float64]
    components: npt.NDArray[np.float64] | None
    location: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]
    cutoff: float

    def distance(self, vector: npt.NDArray[np.float64]) -> float:
        d = _project(vector - self.mean, self.components) - self.location
        return float(np.sqrt(max(float(d @ self.precision @ d), 0.0)))

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": _rounded(self.mean),
            "components": None if self.components is None else _rounded(self.components),
            "location": _rounded(self.location),
            "precision": _rounded(self.precision),
            "cutoff": self.cutoff,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Gauge:
        components = data.get("components")
        return cls(
            mean=np.asarray(data["mean"], dtype=np.float64),
            components=None if components is None else np.asarray(components, dtype=np.float64),
            location=np.asarray(data["location"], dtype=np.float64),
            precision=np.asarray(data["precision"], dtype=np.float64),
            cutoff=float(data["cutoff"]),
        )


@dataclass(frozen=True)
class DomainReference:
    """A checkpoint's reference of its training inputs, and the score of one study against it."""

    checkpoint_sha256: str
    features: _Gauge
    inputs: _Gauge
    input_scale: npt.NDArray[np.float64]
    studies: list[dict[str, Any]]
    description: str = ""

    def score(self, feature: Sequence[float], input_stats: Mapping[str, Any]) -> float | None:
        """The domain score (1.0 = cut-off) of a study's mean feature and input statistics; None
        when the statistics lack a value the reference uses (no aerated lung for the noise)."""
        vector = _input_vector(input_stats)
        if vector is None:
            return None
        f = self.features.distance(np.asarray(feature, dtype=np.float64)) / self.features.cutoff
        s = self.inputs.distance(vector / self.input_scale) / self.inputs.cutoff
        return round(max(f, s), 4)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "checkpoint_sha256": self.checkpoint_sha256,
            "description": self.description,
            "score": "max(feature Mahalanobis, input Mahalanobis), each over its cut-off",
            "cutoff_quantile": CUTOFF_QUANTILE,
            "input_keys": list(INPUT_KEYS),
            "input_scale": _rounded(self.input_scale),
            "features": self.features.to_json(),
            "inputs": self.inputs.to_json(),
            "studies": self.studies,
        }


def reference_path(checkpoint: Path) -> Path:
    """``<checkpoint path without its suffix>.domain.json``."""
    return checkpoint.with_suffix(".domain.json")


def load_reference(checkpoint: Path, sha256: str | None) -> DomainReference | None:
    """The reference beside ``checkpoint`` if it belongs to these weights, else None (logged)."""
    path = reference_path(checkpoint)
    if not path.exists():
        log.info("no domain reference %s: domain scores are not computed", path.name)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        reference = _from_json(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DomainReferenceError(f"domain reference {path} is unreadable: {exc}") from exc
    if sha256 is None or reference.checkpoint_sha256 != sha256:
        log.warning(
            "domain reference %s names checkpoint %s, not the loaded %s: domain scores are not "
            "computed",
            path.name,
            reference.checkpoint_sha256[:12],
            (sha256 or "untrained")[:12],
        )
        return None
    log.info("domain reference %s: %d reference studies", path.name, len(reference.studies))
    return reference


def build_reference(
    checkpoint_sha256: str,
    features: Sequence[Sequence[float]],
    input_stats: Sequence[Mapping[str, Any]],
    *,
    probabilities: Sequence[float],
    names: Sequence[str],
    components: int = DEFAULT_COMPONENTS,
    description: str = "",
) -> DomainReference:
    """Fit the reference on per-study mean features and input statistics of the training-like
    studies; cut-offs from leave-one-out distances. Needs at least ``components + 3`` studies."""
    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0] if x.ndim == 2 else 0
    if n < components + 3 or not len(input_stats) == len(probabilities) == len(names) == n:
        raise ValueError(
            f"need one feature, statistics, probability and name per study and at least "
            f"{components + 3} studies, got {n}"
        )
    vectors = [_input_vector(stats) for stats in input_stats]
    if any(v is None for v in vectors):
        raise ValueError("a reference study lacks an input statistic the score uses")
    raw = np.stack([v for v in vectors if v is not None])
    scale = np.maximum(raw.std(axis=0), 1e-6)
    s = raw / scale
    f_gauge, f_loo = _fit(x, components)
    s_gauge, s_loo = _fit(s, None)
    f_cut = float(np.quantile(f_loo, CUTOFF_QUANTILE))
    s_cut = float(np.quantile(s_loo, CUTOFF_QUANTILE))
    f_gauge = _with_cutoff(f_gauge, f_cut)
    s_gauge = _with_cutoff(s_gauge, s_cut)
    studies = [
        {
            "study": name,
            "input_stats": {k: v for k, v in stats.items() if isinstance(v, int | float)},
            "domain_score": round(max(f / f_cut, d / s_cut), 4),
            "probability": round(float(p), 6),
        }
        for name, stats, f, d, p in zip(
            names, input_stats, f_loo, s_loo, probabilities, strict=True
        )
    ]
    return DomainReference(checkpoint_sha256, f_gauge, s_gauge, scale, studies, description)


def _fit(
    x: npt.NDArray[np.float64], components: int | None
) -> tuple[_Gauge, npt.NDArray[np.float64]]:
    """The gauge fitted on all rows, and each row's distance under a gauge fitted without it."""
    loo = np.array(
        [_gauge(np.delete(x, i, axis=0), components).distance(x[i]) for i in range(len(x))]
    )
    return _gauge(x, components), loo


def _gauge(x: npt.NDArray[np.float64], components: int | None) -> _Gauge:
    mean = x.mean(axis=0)
    projection: npt.NDArray[np.float64] | None = None
    if components is not None:
        pca = PCA(n_components=components, svd_solver="full").fit(x - mean)
        projection = np.asarray(pca.components_, dtype=np.float64)
    y = np.stack([_project(row - mean, projection) for row in x])
    covariance = LedoitWolf().fit(y)
    return _Gauge(
        mean=mean,
        components=projection,
        location=np.asarray(covariance.location_, dtype=np.float64),
        precision=np.asarray(covariance.precision_, dtype=np.float64),
        cutoff=1.0,
    )


def _project(
    centred: npt.NDArray[np.float64], components: npt.NDArray[np.float64] | None
) -> npt.NDArray[np.float64]:
    """The principal-axis coordinates plus the length of what they leave out (a study unlike
    the reference often differs along axes the reference never varied on); identity without."""
    if components is None:
        return centred
    scores = components @ centred
    residual = float(np.linalg.norm(centred - components.T @ scores))
    return np.append(scores, residual)


def _with_cutoff(gauge: _Gauge, cutoff: float) -> _Gauge:
    return _Gauge(gauge.mean, gauge.components, gauge.location, gauge.precision, max(cutoff, 1e-9))


def _input_vector(stats: Mapping[str, Any]) -> npt.NDArray[np.float64] | None:
    values = [stats.get(key) for key in INPUT_KEYS]
    if any(not isinstance(v, int | float) or not np.isfinite(v) for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def _from_json(data: Mapping[str, Any]) -> DomainReference:
    if data.get("format") != FORMAT:
        raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
    if list(data["input_keys"]) != list(INPUT_KEYS):
        raise ValueError(f"input keys {data['input_keys']} are not {list(INPUT_KEYS)}")
    return DomainReference(
        checkpoint_sha256=str(data["checkpoint_sha256"]),
        features=_Gauge.from_json(data["features"]),
        inputs=_Gauge.from_json(data["inputs"]),
        input_scale=np.asarray(data["input_scale"], dtype=np.float64),
        studies=list(data["studies"]),
        description=str(data.get("description", "")),
    )


def _rounded(array: npt.NDArray[np.float64]) -> Any:
    """Six significant digits: the file stays small and the score changes by less than 1e-4."""
    text = json.dumps(np.asarray(array).tolist(), allow_nan=False)
    return json.loads(text, parse_float=lambda t: float(f"{float(t):.6g}"))
