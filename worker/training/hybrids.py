"""Hybrids: one real chest CT series with synthetic COVID-19 lesions, read as the worker reads it.

A hybrid keeps everything of a real series (anatomy, vessels, bronchi, the scanner's noise and
kernel) and adds lesions whose extent is known exactly (``hrct_triage.phantoms.hybrid``), so the
sensitivity and the pointing game of a checkpoint can be measured on a real background.
``hrct-triage hybrids`` builds them (the composition root wires the phantom code in; this room
does not import it) and this module reads the series and scores each volume:

* the series is the one the worker would analyse (``select_series``, or the named series if it
  passes the same rules), loaded by the worker's ``load_volume``;
* the lung mask the lesions are painted into is the worker's segmentation (``lung_mask``) with
  its holes filled slice by slice, as ``realism`` measures it;
* the plain series and every hybrid go through ``worker.method.pipeline.score_volume``: lung
  slices found again on each volume, ``model_input``, ``forward`` in batches, the trimmed mean;
* the pointing game is ``worker.training.pointing``'s, the one ``evaluate`` plays: on each lung
  slice whose lesion mask is non-empty, a hit when the peak of the heat map (the CAM upsampled to
  the image and kept inside the slice's lung field, as the secondary capture shows it) lies
  within the tolerance of the lesion, i.e. inside the mask dilated by that many millimetres. A
  hybrid scores hits over its lesion slices; the overall figure pools the lesion slices of all
  hybrids (``evaluate``'s figure), and the mean of the hybrids' rates is given beside it. The
  same game restricted to lesion slices at or above the threshold is reported too.

Hybrids live in memory only: nothing here writes a file, so no hybrid can end up where training
reads studies. They are an evaluation of real backgrounds, never training data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hrct_triage.common.diagnostic_metrics import proportion_interval
from hrct_triage.worker.method.decision import DecisionRule
from hrct_triage.worker.method.inference import DEFAULT_BATCH_SIZE
from hrct_triage.worker.method.model import LoadedModel
from hrct_triage.worker.method.pipeline import VolumeScores, score_volume
from hrct_triage.worker.method.results import NotApplicable
from hrct_triage.worker.method.series import read_headers, select_from_headers
from hrct_triage.worker.method.volume import CTVolume, load_volume
from hrct_triage.worker.training.dataset import slice_numbers, study_paths
from hrct_triage.worker.training.pointing import DEFAULT_POINTING_TOLERANCE_MM, pointing_game
from hrct_triage.worker.training.realism import filled_lung

__all__ = [
    "HYBRIDS_NOTE",
    "Background",
    "HybridResult",
    "Reading",
    "hybrid_plan",
    "load_background",
    "read_volume",
    "report",
    "score_hybrid",
]

log = logging.getLogger(__name__)

Mask = npt.NDArray[np.bool_]

HYBRIDS_NOTE = (
    "Hybrids are a real-background evaluation only: a real series with synthetic COVID-19 "
    "lesions inserted in memory, never written to disk and never used for training. Their "
    "lesions are the phantom generator's, so the figures say how the weights find phantom-like "
    "lesions on real anatomy, noise and kernels, not how they find real COVID-19."
)
PHANTOM_TRAINED_NOTE = (
    "The weights were trained on synthetic phantoms only: the plain series' result and the "
    "hybrids' figures measure how phantom-trained weights transfer to this real series."
)


@dataclass(frozen=True)
class Background:
    """The real series hybrids are built on, as the worker loads it."""

    folder: Path
    volume: CTVolume
    kernel: str
    slice_thickness: float  # mm: SliceThickness, else the slice spacing
    lung: Mask  # the worker's lung segmentation, holes filled slice by slice

    @property
    def z(self) -> npt.NDArray[np.float64]:
        """Slice positions along the table (mm), superior first, for ``insert_covid``.

        The loader has checked that the slices are evenly spaced along their normal, so the
        positions are the spacing times the index (only differences matter).
        """
        return -self.volume.slice_spacing * np.arange(self.volume.shape[0], dtype=np.float64)

    @property
    def pixel_spacing(self) -> float:
        """The one in-plane spacing (mm) of the square pixels."""
        return float(self.volume.pixel_spacing[0])

    def describe(self) -> dict[str, Any]:
        slices, rows, columns = self.volume.shape
        return {
            "folder": str(self.folder),
            "series_uid": self.volume.series_uid,
            "kernel": self.kernel,
            "slices": slices,
            "rows": rows,
            "columns": columns,
            "pixel_spacing_mm": list(self.volume.pixel_spacing),
            "slice_thickness_mm": self.slice_thickness,
            "slice_spacing_mm": self.volume.slice_spacing,
        }


def load_background(
    folder: Path, *, series_uid: str | None = None, min_slices: int = 20
) -> Background:
    """The series of ``folder`` (a series or a whole study) that the worker would analyse, or
    the series ``series_uid`` if it passes the worker's selection rules.

    Raises :class:`NotApplicable` when no series fits (or the named one does not) and
    ``ValueError`` when the images are not square with square pixels (the lesion painter's grid).
    """
    headers = read_headers(study_paths(folder))
    if series_uid is not None:
        found = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
        headers = [(p, ds) for p, ds in headers if ds.get("SeriesInstanceUID") == series_uid]
        if not headers:
            raise NotApplicable(
                f"no series {series_uid} in {folder}; its series: {', '.join(found) or 'none'}"
            )
    series = select_from_headers(headers, min_slices=min_slices)
    volume = load_volume(series)
    _, rows, columns = volume.shape
    row_mm, column_mm = volume.pixel_spacing
    if rows != columns or abs(row_mm - column_mm) > 1e-3 * row_mm:
        raise ValueError(
            f"series {volume.series_uid}: hybrids need square images with square pixels, "
            f"got {rows} x {columns} pixels of {row_mm:g} x {column_mm:g} mm"
        )
    thickness = series.slice_thickness
    return Background(
        folder=folder,
        volume=volume,
        kernel=series.kernel,
        slice_thickness=thickness if thickness is not None else volume.slice_spacing,
        lung=filled_lung(volume.hu, volume.pixel_spacing),
    )


@dataclass(frozen=True)
class Reading:
    """The worker's result for one volume at the decision rule."""

    probability: float  # the study probability: trimmed mean of the lung slices
    positive: bool  # probability >= threshold
    lung_slices: int
    slices_above: int  # lung slices whose own probability is at or above the threshold

    @property
    def fraction_above(self) -> float:
        return self.slices_above / self.lung_slices if self.lung_slices else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "probability": self.probability,
            "result": "POSITIVE" if self.positive else "NEGATIVE",
            "lung_slices": self.lung_slices,
            "slices_above_threshold": self.slices_above,
            "fraction_above_threshold": self.fraction_above,
        }


def read_volume(
    volume: CTVolume,
    model: LoadedModel,
    rule: DecisionRule,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[Reading, VolumeScores]:
    """Score ``volume`` through the worker's inference path and apply ``rule``."""
    scored = score_volume(volume, model, trim_fraction=rule.trim_fraction, batch_size=batch_size)
    probability = scored.study.probability
    reading = Reading(
        probability=probability,
        positive=probability >= rule.threshold,
        lung_slices=int(scored.lung.size),
        slices_above=int(np.count_nonzero(scored.scores.probabilities >= rule.threshold)),
    )
    return reading, scored


def slice_readings(volume: CTVolume, scored: VolumeScores) -> list[dict[str, Any]]:
    """Each lung slice of a scored volume, in table order: its SOP Instance UID, InstanceNumber
    (frame number for Enhanced CT) and probability, so that a reader can open the slices the
    weights flag on a real series."""
    numbers = slice_numbers(volume)
    return [
        {
            "sop_instance_uid": volume.sop_instance_uids[int(index)],
            "instance_number": int(numbers[int(index)]),
            "probability": float(probability),
        }
        for index, probability in zip(scored.lung, scored.scores.probabilities, strict=True)
    ]


@dataclass(frozen=True)
class PointingScore:
    hits: int
    slices: int

    @property
    def rate(self) -> float | None:
        return self.hits / self.slices if self.slices else None

    def as_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "slices": self.slices, "rate": self.rate}


@dataclass(frozen=True)
class HybridResult:
    """One hybrid: how it was made, what the worker made of it, where its heat maps point."""

    index: int
    seed: int
    severity: str
    lesion_slices: int  # slices with a non-empty lesion mask
    lesion_voxels: int
    reading: Reading
    pointing: PointingScore  # every lung slice with a lesion
    pointing_flagged: PointingScore  # only those whose probability reaches the threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.seed,
            "severity": self.severity,
            "lesion_slices": self.lesion_slices,
            "lesion_voxels": self.lesion_voxels,
            **self.reading.as_dict(),
            "pointing_game": self.pointing.as_dict(),
            "pointing_game_slices_above_threshold": self.pointing_flagged.as_dict(),
        }


def hybrid_plan(count: int, severities: Sequence[str], seed: int) -> list[tuple[int, int, str]]:
    """(index, seed, severity) of each hybrid: seeds ``seed``, ``seed + 1``, ...; severities
    taken in turn from ``severities``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not severities:
        raise ValueError("at least one severity is needed")
    return [(i, seed + i, severities[i % len(severities)]) for i in range(count)]


def score_hybrid(
    background: Background,
    hu: npt.NDArray[np.floating],
    lesion: Mask,
    *,
    index: int,
    seed: int,
    severity: str,
    model: LoadedModel,
    rule: DecisionRule,
    tolerance_mm: float = DEFAULT_POINTING_TOLERANCE_MM,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> HybridResult:
    """Read the hybrid ``hu`` (the background's shape, same slices) as the worker would and play
    the pointing game on its lesion slices."""
    if hu.shape != background.volume.shape or lesion.shape != background.volume.shape:
        raise ValueError(
            f"hybrid is {hu.shape} with a {lesion.shape} mask, the series {background.volume.shape}"
        )
    volume = replace(background.volume, hu=np.asarray(hu, dtype=np.float32))
    reading, scored = read_volume(volume, model, rule, batch_size=batch_size)
    per_slice = lesion.any(axis=(1, 2))
    masks: Mapping[int, Mask] = {int(k): lesion[k] for k in np.flatnonzero(per_slice)}
    outcome = pointing_game(
        volume.hu,
        scored.lung,
        scored.scores.cams,
        masks,
        pixel_spacing=volume.pixel_spacing,
        tolerance_mm=tolerance_mm,
    )
    probabilities = scored.scores.probabilities
    flagged = {p: hit for p, hit in outcome.items() if probabilities[p] >= rule.threshold}
    return HybridResult(
        index=index,
        seed=seed,
        severity=severity,
        lesion_slices=int(per_slice.sum()),
        lesion_voxels=int(lesion.sum()),
        reading=reading,
        pointing=PointingScore(sum(outcome.values()), len(outcome)),
        pointing_flagged=PointingScore(sum(flagged.values()), len(flagged)),
    )


def report(
    *,
    background: Background,
    model: LoadedModel,
    checkpoint: Path | None,
    rule: DecisionRule,
    plain: Reading,
    hybrids: Sequence[HybridResult],
    seed: int,
    severities: Sequence[str],
    tolerance_mm: float,
    confidence: float = 0.95,
    seconds: float | None = None,
) -> dict[str, Any]:
    """Every figure of a run as one JSON-ready document.

    Sensitivity counts the hybrids that have a lesion (a hybrid whose lesions fell outside every
    slice would not be a positive), with its Wilson interval.
    """
    counted = [h for h in hybrids if h.lesion_voxels > 0]
    detected = sum(h.reading.positive for h in counted)
    interval = proportion_interval(detected, len(counted), confidence=confidence)
    hits = sum(h.pointing.hits for h in counted)
    slices = sum(h.pointing.slices for h in counted)
    rates = [h.pointing.rate for h in counted if h.pointing.rate is not None]
    flagged_hits = sum(h.pointing_flagged.hits for h in counted)
    flagged_slices = sum(h.pointing_flagged.slices for h in counted)
    by_severity: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(h.severity for h in counted):
        group = [h for h in counted if h.severity == name]
        found = sum(h.reading.positive for h in group)
        group_hits = sum(h.pointing.hits for h in group)
        group_slices = sum(h.pointing.slices for h in group)
        by_severity[name] = {
            "hybrids": len(group),
            "detected": found,
            "sensitivity": found / len(group),
            "probabilities": [h.reading.probability for h in group],
            "pointing_game": PointingScore(group_hits, group_slices).as_dict(),
        }
    phantom_trained = _phantom_trained(model)
    return {
        "command": "hybrids",
        "note": HYBRIDS_NOTE,
        "weights_note": PHANTOM_TRAINED_NOTE if phantom_trained else None,
        "phantom_trained_weights": phantom_trained,
        "model": asdict(model.info),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "threshold": rule.threshold,
        "trim_fraction": rule.trim_fraction,
        "pointing_tolerance_mm": tolerance_mm,
        "series": background.describe(),
        "plain": plain.as_dict(),
        "settings": {"count": len(hybrids), "severities": list(severities), "seed": seed},
        "hybrids": [h.as_dict() for h in hybrids],
        "summary": {
            "hybrids": len(counted),
            "without_lesion": len(hybrids) - len(counted),
            "detected": detected,
            "sensitivity": detected / len(counted) if counted else None,
            "sensitivity_ci": None if interval is None else list(interval),
            "ci_method": "wilson",
            "confidence": confidence,
            "pointing_game": {
                "hits": hits,
                "slices": slices,
                "rate": hits / slices if slices else None,
                "mean_of_hybrids": float(np.mean(rates)) if rates else None,
            },
            "pointing_game_slices_above_threshold": PointingScore(
                flagged_hits, flagged_slices
            ).as_dict(),
            "by_severity": by_severity,
        },
        "seconds": seconds,
    }


def _phantom_trained(model: LoadedModel) -> bool:
    """What the checkpoint says of itself: "phantom" in its version or training data."""
    info = model.info
    return "phantom" in info.version.lower() or "phantom" in info.trained_on.lower()
