"""Builds the outputs of one analysis and files them under the data folder.

The SCs are built first because the SR cites them. Files are written durably (the worklist will
point at them, and a redelivery re-sends them byte for byte).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from io import BytesIO
from pathlib import Path

from pydicom import Dataset

from db.settings import Settings
from db.worklist import OutputRecord
from db.storage import write_durably
from worker.results import StudyAnalysis


def build_study_outputs(
    analysis: StudyAnalysis,
    headers: Sequence[Dataset],
    *,
    generation: int,
    content_datetime: datetime,
    predecessor: Dataset | None,
    out_dir: Path,
    settings: Settings,
) -> list[OutputRecord]:
    from worker.sc import build_heatmap_scs
    from worker.sr import build_sr

    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    scs = build_heatmap_scs(analysis, by_uid, content_datetime=content_datetime,
                            series_number=settings.sc_series_number)
    sr = build_sr(analysis, headers, scs, content_datetime=content_datetime,
                  series_number=settings.sr_series_number, predecessor=predecessor)
    records = [_file(ds, "sc", out_dir) for ds in scs]
    records.append(_file(sr, "sr", out_dir))
    return records


def _file(dataset: Dataset, kind: str, out_dir: Path) -> OutputRecord:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    path = out_dir / f"{kind}-{dataset.SOPInstanceUID}.dcm"
    write_durably(path, buffer.getvalue())
    return OutputRecord(kind=kind, sop_instance_uid=str(dataset.SOPInstanceUID),
                        sop_class_uid=str(dataset.SOPClassUID),
                        series_uid=str(dataset.SeriesInstanceUID), path=str(path))
