"""The outputs' one entry point: a study's result becomes DICOM objects, filed where the worklist
will point.

The objects are rebuilt byte for byte by a redelivered task: ``content_datetime`` comes from the
worklist (when this analysis was queued) and ``generation`` is the analysis generation, which
the objects carry as their ``analysis_id``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import Dataset, dcmread

from hrct_triage.common.storage import write_durably
from hrct_triage.db.worklist import OutputRecord
from hrct_triage.worker.method.results import ModelInfo, StudyAnalysis
from hrct_triage.worker.outputs.objects import SeriesLabels, build_outputs, encode
from hrct_triage.worker.outputs.sr import build_not_analysed_sr


@dataclass(frozen=True)
class Analysed:
    """A study the method analysed: its result and the analysed series' headers.

    ``headers`` need no pixel data; they must cover every analysed slice and every heat-map slice.
    """

    analysis: StudyAnalysis
    headers: Sequence[Dataset]


@dataclass(frozen=True)
class NotAnalysed:
    """A study the method declined: why, the model that declined it, and every received
    instance, which the SR cites as its evidence."""

    instance_paths: Sequence[Path]
    reason: str
    model: ModelInfo


def write_outputs(
    result: Analysed | NotAnalysed,
    *,
    generation: int,
    content_datetime: datetime,
    predecessor: Dataset | None,
    out_dir: Path,
    labels: SeriesLabels = SeriesLabels(),
) -> list[OutputRecord]:
    """The result's objects written durably under ``out_dir``; returns their worklist records.

    An analysed study gives its heat-map SCs then the SR (the order to send them in); a declined
    one gives the SR saying it was not analysed and why.
    """
    if isinstance(result, Analysed):
        analysis = dataclasses.replace(result.analysis, analysis_id=str(generation))
        outputs = build_outputs(
            analysis,
            result.headers,
            content_datetime=content_datetime,
            predecessor=predecessor,
            labels=labels,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        return [
            _record("sr" if dataset is outputs.sr else "sc", dataset, out_dir)
            for dataset in outputs.all
        ]
    sr = _not_analysed_sr(
        result,
        generation=generation,
        content_datetime=content_datetime,
        predecessor=predecessor,
        labels=labels,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_record("sr", sr, out_dir)]


def _not_analysed_sr(
    result: NotAnalysed,
    *,
    generation: int,
    content_datetime: datetime,
    predecessor: Dataset | None,
    labels: SeriesLabels,
) -> Dataset:
    """The not-analysed SR; its evidence is every received instance, read header-only (a
    refused study can be large and none of its pixels are needed)."""
    if not result.instance_paths:
        raise ValueError("instance_paths: the study has no instance to cite")
    headers = [dcmread(path, stop_before_pixels=True) for path in result.instance_paths]
    return build_not_analysed_sr(
        headers,
        result.reason,
        result.model,
        content_datetime=content_datetime,
        series_number=labels.sr_number,
        series_description=labels.sr_description,
        analysis_id=str(generation),
        predecessor=predecessor,
    )


def _record(kind: str, dataset: Dataset, out_dir: Path) -> OutputRecord:
    """Write ``dataset`` durably and describe it for the worklist."""
    return OutputRecord(
        kind=kind,
        sop_instance_uid=str(dataset.SOPInstanceUID),
        sop_class_uid=str(dataset.SOPClassUID),
        series_uid=str(dataset.SeriesInstanceUID),
        path=str(write_output(dataset, out_dir)),
    )


def write_output(ds: Dataset, directory: str | os.PathLike[str]) -> Path:
    """Write ``ds`` durably as ``<directory>/<SOPInstanceUID>.dcm`` and return the path.

    Durable (``common.storage.write_durably``): a crash never leaves a half file under the final
    name, and writing the same object twice is harmless.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(f"directory: {folder} is not a directory")
    uid = str(ds.get("SOPInstanceUID", ""))
    if not uid or not all(c.isdigit() or c == "." for c in uid):
        raise ValueError(f"ds: SOPInstanceUID {uid!r} is not a UID")
    return write_durably(folder / f"{uid}.dcm", encode(ds)).path
