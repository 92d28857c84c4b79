"""One study in, one analysis out: the Yang et al. 2020 method as plain functions.

The Celery task calls :func:`analyse_study` with the study's instance files and a loaded model;
everything here is free of Celery and the database so that it can be tested, timed and reused by
the evaluation code on its own. Contract:

* returns the :class:`StudyAnalysis` and the header-only datasets of the analysed (lung) slices,
  one per ``analysis.slices`` entry and in the same (table) order, for the SR and the SC;
* raises :class:`NotApplicable` when no series fits or the chosen one shows no lung;
* lets every other error propagate (the task turns it into a retry or a failure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from hrct_triage.worker.method.decision import decision_rule
from hrct_triage.worker.method.inference import (
    DEFAULT_BATCH_SIZE,
    SliceScores,
    StudyScore,
    cam_image,
    forward,
    study_probability,
    top_slices,
)
from hrct_triage.worker.method.input_statistics import input_statistics
from hrct_triage.worker.method.model import LoadedModel
from hrct_triage.worker.method.preprocess import (
    LungSettings,
    lung_field,
    lung_slices,
    lung_window,
    model_input,
)
from hrct_triage.worker.method.results import HeatMap, NotApplicable, SliceResult, StudyAnalysis
from hrct_triage.worker.method.series import select_series
from hrct_triage.worker.method.volume import CTVolume, load_volume

__all__ = [
    "VolumeScores",
    "analyse_study",
    "score_volume",
    "slice_heat_map",
    "study_domain_score",
]

log = logging.getLogger(__name__)


def analyse_study(
    study_uid: str,
    paths: Sequence[Path],
    model: LoadedModel,
    *,
    threshold: float | None = None,
    trim_fraction: float | None = None,
    heatmaps: int = 3,
    min_slices: int = 20,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lung_settings: LungSettings = LungSettings(),
) -> tuple[StudyAnalysis, list[Dataset]]:
    """Select the series, build the HU volume, score every lung slice, trim, average, map.

    ``threshold`` and ``trim_fraction`` override the checkpoint's (``worker.method.decision``).
    """
    if heatmaps < 0:
        raise ValueError(f"heatmaps must be >= 0, got {heatmaps}")
    rule = decision_rule(model.metadata, threshold=threshold, trim_fraction=trim_fraction)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with _timed(timings, "select"):
        series = select_series(paths, min_slices=min_slices)
    with _timed(timings, "load"):
        volume = load_volume(series)
    scored = score_volume(
        volume,
        model,
        trim_fraction=rule.trim_fraction,
        batch_size=batch_size,
        lung_settings=lung_settings,
        timings=timings,
    )
    lung, scores, score = scored.lung, scored.scores, scored.study
    probabilities = [float(p) for p in scores.probabilities]
    with _timed(timings, "statistics"):
        stats = input_statistics(
            volume.hu,
            lung,
            pixel_spacing=volume.pixel_spacing,
            slice_spacing=volume.slice_spacing,
            settings=lung_settings,
        )
        domain_score = study_domain_score(model, scored, stats)
    with _timed(timings, "cam"):
        maps = _heatmaps(
            volume, lung, scores, score.kept, count=heatmaps, model=model, settings=lung_settings
        )
    timings["total"] = time.perf_counter() - started
    analysis = StudyAnalysis(
        study_uid=study_uid,
        series_uid=volume.series_uid,
        probability=score.probability,
        threshold=rule.threshold,
        positive=score.probability >= rule.threshold,
        slices=[_slice_result(volume, int(i), p) for i, p in zip(lung, probabilities, strict=True)],
        kept=[volume.sop_instance_uids[lung[i]] for i in score.kept],
        heatmaps=maps,
        model=model.info,
        trim_fraction=rule.trim_fraction,
        timings=timings,
        input_stats=stats,
        station_name=_text(volume.headers[0].get("StationName")),
        convolution_kernel=series.kernel or None,
        slice_thickness=series.slice_thickness,
        domain_score=domain_score,
        in_domain=None if domain_score is None else domain_score <= 1.0,
    )
    log.info(
        "study %s series %s: %d/%d lung slices, %d kept, probability %.4f (%s), domain score %s, "
        "%.1f s",
        study_uid,
        volume.series_uid,
        len(lung),
        volume.shape[0],
        len(score.kept),
        score.probability,
        "positive" if analysis.positive else "negative",
        "none" if domain_score is None else f"{domain_score:.2f}",
        timings["total"],
    )
    return analysis, [volume.headers[i] for i in lung]


@dataclass(frozen=True)
class VolumeScores:
    """The network's reading of one HU volume: which slices are lung, their scores, the mean."""

    lung: npt.NDArray[np.intp]  # volume indices of the lung slices, in table order
    scores: SliceScores  # one probability and one raw CAM per lung slice, in the same order
    study: StudyScore  # the trimmed mean over the lung slices


def score_volume(
    volume: CTVolume,
    model: LoadedModel,
    *,
    trim_fraction: float,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lung_settings: LungSettings = LungSettings(),
    timings: dict[str, float] | None = None,
) -> VolumeScores:
    """Lung slices, network input, forward pass and trimmed mean of a loaded volume.

    The part of :func:`analyse_study` after the files are read, for callers that hold the volume
    already (evaluation of altered volumes); ``timings`` gets "preprocess" and "forward".
    Raises :class:`NotApplicable` when no slice shows lung.
    """
    stages = {} if timings is None else timings
    with _timed(stages, "preprocess"):
        lung = _lung_indices(volume, lung_settings)
        inputs = model_input(
            volume.hu,
            indices=lung,
            size=model.info.input_size,
            width=model.info.window_width,
            level=model.info.window_level,
            device=model.device,
        )
    with _timed(stages, "forward"):
        scores = forward(model, inputs, batch_size=batch_size)
    probabilities = [float(p) for p in scores.probabilities]
    return VolumeScores(lung, scores, study_probability(probabilities, trim_fraction=trim_fraction))


def study_domain_score(
    model: LoadedModel, scored: VolumeScores, input_stats: dict[str, Any]
) -> float | None:
    """The study's domain score against the checkpoint's reference (``worker.method.domain``):
    the mean pooled feature of the kept lung slices and the input statistics; None without one."""
    if model.domain is None or scored.scores.features.shape[0] == 0:
        return None
    kept = scored.scores.features[list(scored.study.kept)]
    return model.domain.score(kept.mean(axis=0).tolist(), input_stats)


def slice_heat_map(
    hu: npt.NDArray[np.floating],
    cam: npt.NDArray[np.float32],
    *,
    pixel_spacing: Sequence[float],
    settings: LungSettings = LungSettings(),
) -> npt.NDArray[np.float32]:
    """The heat map of one slice as the secondary capture draws it: the raw CAM upsampled to the
    slice's rows and columns, zero outside the slice's lung field, scaled to [0, 1]."""
    rows, columns = hu.shape
    return cam_image(
        cam,
        rows=rows,
        columns=columns,
        region=lung_field(hu, pixel_spacing=pixel_spacing, settings=settings),
    )


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = time.perf_counter() - start


def _text(value: object) -> str | None:
    """A header string as the worklist stores it (64 characters at most), None when empty."""
    text = str(value).strip() if value is not None else ""
    return text[:64] or None


def _lung_indices(volume: CTVolume, settings: LungSettings) -> npt.NDArray[np.intp]:
    mask = lung_slices(volume.hu, pixel_spacing=volume.pixel_spacing, settings=settings)
    lung = np.flatnonzero(mask)
    if lung.size == 0:
        raise NotApplicable(
            f"series {volume.series_uid}: no slice shows lung parenchyma "
            f"(at least {settings.min_lung_area_mm2:g} mm^2 of air inside the body)"
        )
    return lung


def _slice_result(volume: CTVolume, index: int, probability: float) -> SliceResult:
    return SliceResult(
        sop_instance_uid=volume.sop_instance_uids[index],
        probability=probability,
        frame_number=volume.frame_numbers[index] if volume.frame_numbers else None,
    )


def _heatmaps(
    volume: CTVolume,
    lung: npt.NDArray[np.intp],
    scores: SliceScores,
    kept: range,
    *,
    count: int,
    model: LoadedModel,
    settings: LungSettings,
) -> list[HeatMap]:
    maps: list[HeatMap] = []
    for position, weight in top_slices(scores.probabilities.tolist(), kept, count=count):
        index = int(lung[position])
        maps.append(
            HeatMap(
                sop_instance_uid=volume.sop_instance_uids[index],
                weight=weight,
                probability=float(scores.probabilities[position]),
                lung_window=lung_window(
                    volume.hu[index], width=model.info.window_width, level=model.info.window_level
                ),
                cam=slice_heat_map(
                    volume.hu[index],
                    scores.cams[position],
                    pixel_spacing=volume.pixel_spacing,
                    settings=settings,
                ),
                frame_number=volume.frame_numbers[index] if volume.frame_numbers else None,
            )
        )
    return maps
