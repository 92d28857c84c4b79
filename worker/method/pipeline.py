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
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from hrct_triage.worker.method.decision import decision_rule
from hrct_triage.worker.method.inference import (
    DEFAULT_BATCH_SIZE,
    SliceScores,
    cam_image,
    forward,
    study_probability,
    top_slices,
)
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

__all__ = ["analyse_study"]

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
    with _timed(timings, "preprocess"):
        lung = _lung_indices(volume, lung_settings)
        inputs = model_input(
            volume.hu,
            indices=lung,
            size=model.info.input_size,
            width=model.info.window_width,
            level=model.info.window_level,
            device=model.device,
        )
    with _timed(timings, "forward"):
        scores = forward(model, inputs, batch_size=batch_size)
    probabilities = [float(p) for p in scores.probabilities]
    score = study_probability(probabilities, trim_fraction=rule.trim_fraction)
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
    )
    log.info(
        "study %s series %s: %d/%d lung slices, %d kept, probability %.4f (%s), %.1f s",
        study_uid,
        volume.series_uid,
        len(lung),
        volume.shape[0],
        len(score.kept),
        score.probability,
        "positive" if analysis.positive else "negative",
        timings["total"],
    )
    return analysis, [volume.headers[i] for i in lung]


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = time.perf_counter() - start


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
    _, rows, columns = volume.shape
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
                cam=cam_image(
                    scores.cams[position],
                    rows=rows,
                    columns=columns,
                    region=lung_field(
                        volume.hu[index], pixel_spacing=volume.pixel_spacing, settings=settings
                    ),
                ),
                frame_number=volume.frame_numbers[index] if volume.frame_numbers else None,
            )
        )
    return maps
