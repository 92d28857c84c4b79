"""Builds the outputs of one analysis and files them where the worklist will point.

The objects are rebuilt byte for byte by a redelivered task: ``content_datetime`` comes from the
worklist (when this analysis was queued) and ``analysis_id`` is the analysis generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from pydicom import Dataset, dcmread

from hrct_triage.db.worklist import OutputRecord
from hrct_triage.worker.method.results import ModelInfo, StudyAnalysis
from hrct_triage.worker.outputs.objects import SeriesLabels, build_outputs, write_output
from hrct_triage.worker.outputs.sr import build_not_analysed_sr


def build_study_outputs(
    analysis: StudyAnalysis,
    headers: Sequence[Dataset],
    *,
    generation: int,
    content_datetime: datetime,
    predecessor: Dataset | None,
    out_dir: Path,
    labels: SeriesLabels = SeriesLabels(),
) -> list[OutputRecord]:
    """SCs then the SR, written durably under ``out_dir``; returns their worklist records."""
    analysis = dataclasses.replace(analysis, analysis_id=str(generation))
    outputs = build_outputs(
        analysis,
        headers,
        content_datetime=content_datetime,
        predecessor=predecessor,
        labels=labels,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _record("sr" if dataset is outputs.sr else "sc", dataset, out_dir)
        for dataset in outputs.all
    ]


def build_not_analysed_output(
    instance_paths: Sequence[Path],
    reason: str,
    model: ModelInfo,
    *,
    generation: int,
    content_datetime: datetime,
    predecessor: Dataset | None,
    out_dir: Path,
    labels: SeriesLabels = SeriesLabels(),
) -> list[OutputRecord]:
    """The SR saying the study was not analysed and why, written under ``out_dir``.

    Its evidence is every received instance, read header-only (a refused study can be large
    and none of its pixels are needed).
    """
    if not instance_paths:
        raise ValueError("instance_paths: the study has no instance to cite")
    headers = [dcmread(path, stop_before_pixels=True) for path in instance_paths]
    sr = build_not_analysed_sr(
        headers,
        reason,
        model,
        content_datetime=content_datetime,
        series_number=labels.sr_number,
        series_description=labels.sr_description,
        analysis_id=str(generation),
        predecessor=predecessor,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_record("sr", sr, out_dir)]


def _record(kind: str, dataset: Dataset, out_dir: Path) -> OutputRecord:
    """Write ``dataset`` durably and describe it for the worklist."""
    return OutputRecord(
        kind=kind,
        sop_instance_uid=str(dataset.SOPInstanceUID),
        sop_class_uid=str(dataset.SOPClassUID),
        series_uid=str(dataset.SeriesInstanceUID),
        path=str(write_output(dataset, out_dir)),
    )
