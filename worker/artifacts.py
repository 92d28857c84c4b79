"""Builds the outputs of one analysis and files them where the worklist will point.

The objects are rebuilt byte for byte by a redelivered task: ``content_datetime`` comes from the
worklist (when this analysis was queued) and ``analysis_id`` is the analysis generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from pydicom import Dataset

from db.worklist import OutputRecord
from worker.outputs import build_outputs, write_output
from worker.results import StudyAnalysis


def build_study_outputs(
    analysis: StudyAnalysis,
    headers: Sequence[Dataset],
    *,
    generation: int,
    content_datetime: datetime,
    predecessor: Dataset | None,
    out_dir: Path,
) -> list[OutputRecord]:
    """SCs then the SR, written durably under ``out_dir``; returns their worklist records."""
    analysis = dataclasses.replace(analysis, analysis_id=str(generation))
    outputs = build_outputs(
        analysis, headers, content_datetime=content_datetime, predecessor=predecessor
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        OutputRecord(
            kind="sr" if dataset is outputs.sr else "sc",
            sop_instance_uid=str(dataset.SOPInstanceUID),
            sop_class_uid=str(dataset.SOPClassUID),
            series_uid=str(dataset.SeriesInstanceUID),
            path=str(write_output(dataset, out_dir)),
        )
        for dataset in outputs.all
    ]
