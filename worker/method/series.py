"""Pick the one series of a study that the Yang et al. 2020 method can analyse.

A study forwarded by a scanner usually holds several series: the localizer (scout), thick
reconstructions, thin lung-kernel reconstructions, dose reports, secondary captures. The paper
analysed thin-section axial HRCT, so the gateway picks the series closest to that. The rules are
written so a PACS administrator can read them, and when no series fits, the reason names every
series and the first rule it failed, because that text ends up in the worklist.

Headers are parsed once, here; pixel data and other large values stay on disk (``defer_size``)
until ``volume`` decodes the chosen series, which thus reads each file's header only once. Plain
files are read by ``worker.method.header_reader`` (the same datasets as pydicom's, in half the
time), the others by pydicom.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import SupportsFloat, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from hrct_triage.worker.method.header_reader import read_file_header
from hrct_triage.worker.method.results import NotApplicable

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "SelectedSeries",
    "read_headers",
    "select_from_headers",
    "select_series",
]

log = logging.getLogger(__name__)

# Values larger than this are left on disk and read on first access (pydicom's deferred read):
# pixel data, and huge private elements that selection never looks at.
DEFERRED_VALUE_BYTES = 64 * 1024

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
_CT_SOP_CLASSES = {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE}

# Axial means: rows run along the patient's left-right axis and columns along the
# anterior-posterior axis. Either sign is accepted (feet-first and prone scans flip them; the paper
# trained with random flips). 10 degrees leaves room for small rounding in scanner headers but
# rejects tilted gantries and reformats, whose slices are not stacked along the table.
DEFAULT_ORIENTATION_TOL_DEG = 10.0

# Reconstruction kernels made for lung parenchyma or sharp detail, by vendor naming habit:
# GE LUNG/BONE/EDGE/DETAIL, Siemens B6x-B8x, Br6x+, Bl (lung), Canon FC5x/FC8x, Philips YA-YC/L.
_SHARP_KERNEL = re.compile(
    r"LUNG|SHARP|BONE|EDGE|DETAIL|HIGH|^B[6-8]\d|^BR[6-9]\d|^BL\d|^FC[58]\d|^Y[A-C]$|^L$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SelectedSeries:
    """The series chosen for analysis: its files and their headers, in the order they were given.

    ``multiframe`` is True for an Enhanced CT series (one instance holding every slice);
    ``slice_count`` counts frames then, instances otherwise.
    """

    series_uid: str
    paths: tuple[Path, ...]
    headers: tuple[Dataset, ...]
    slice_count: int
    slice_thickness: float | None
    kernel: str
    multiframe: bool


def read_headers(paths: Iterable[Path]) -> list[tuple[Path, Dataset]]:
    """Headers of every readable DICOM file; unreadable files are logged (path only) and skipped.

    Values over ``DEFERRED_VALUE_BYTES`` (pixel data above all) are not read: they load from the
    file when first accessed, so the headers of a whole study cost little memory. Each dataset
    is the one ``pydicom.dcmread(path, defer_size=DEFERRED_VALUE_BYTES)`` gives.
    """
    headers: list[tuple[Path, Dataset]] = []
    for path in paths:
        try:
            header = read_file_header(path, defer_size=DEFERRED_VALUE_BYTES)
            if header is None:
                header = pydicom.dcmread(path, defer_size=DEFERRED_VALUE_BYTES)
            headers.append((path, header))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            log.warning("skipping unreadable DICOM file %s: %s", path, type(exc).__name__)
    return headers


def select_series(
    paths: Sequence[Path],
    *,
    min_slices: int = 20,
    orientation_tol_deg: float = DEFAULT_ORIENTATION_TOL_DEG,
) -> SelectedSeries:
    """Choose the series to analyse, or raise :class:`NotApplicable` saying why none fits.

    A candidate is CT Image or Enhanced CT Image storage, modality CT, every image ORIGINAL and
    none a LOCALIZER, axial, with at least ``min_slices`` slices. Among candidates the thinnest
    SliceThickness wins, then a lung/sharp kernel, then the most slices.
    """
    if min_slices < 1:
        raise ValueError(f"min_slices must be >= 1, got {min_slices}")
    return select_from_headers(
        read_headers(paths), min_slices=min_slices, orientation_tol_deg=orientation_tol_deg
    )


def select_from_headers(
    headers: Sequence[tuple[Path, Dataset]],
    *,
    min_slices: int = 20,
    orientation_tol_deg: float = DEFAULT_ORIENTATION_TOL_DEG,
) -> SelectedSeries:
    """:func:`select_series` over headers already read, as (path, header-only dataset) pairs."""
    if min_slices < 1:
        raise ValueError(f"min_slices must be >= 1, got {min_slices}")
    groups = _group_by_series(headers)
    if not groups:
        raise NotApplicable("no axial CT series fit for analysis: no readable DICOM instance")
    candidates: list[SelectedSeries] = []
    rejections: list[str] = []
    for series_uid, members in groups.items():
        problem = _rejection(
            members, min_slices=min_slices, orientation_tol_deg=orientation_tol_deg
        )
        if problem is None:
            candidates.append(_as_selected(series_uid, members))
        else:
            rejections.append(f"{series_uid} {problem}")
    if not candidates:
        raise NotApplicable("no axial CT series fit for analysis: " + "; ".join(rejections))
    chosen = min(candidates, key=_preference)
    log.info(
        "chose series %s (%d slices, thickness %s mm, kernel %r) among %d candidate(s)",
        chosen.series_uid,
        chosen.slice_count,
        chosen.slice_thickness,
        chosen.kernel,
        len(candidates),
    )
    return chosen


def _group_by_series(
    headers: Sequence[tuple[Path, Dataset]],
) -> dict[str, list[tuple[Path, Dataset]]]:
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in headers:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "(no SeriesInstanceUID)")), []).append(
            (path, ds)
        )
    return groups


def _rejection(
    members: list[tuple[Path, Dataset]], *, min_slices: int, orientation_tol_deg: float
) -> str | None:
    """The first selection rule the series fails, worded for the worklist; None if it fits."""
    datasets = [ds for _, ds in members]
    first = datasets[0]
    modality = str(first.get("Modality", "no modality"))
    sop_classes = {str(ds.get("SOPClassUID", "")) for ds in datasets}
    if not sop_classes <= _CT_SOP_CLASSES:
        return f"({modality}) not CT image storage"
    if len(sop_classes) > 1:
        return "mixes CT Image and Enhanced CT Image storage"
    if any(str(ds.get("Modality", "")) != "CT" for ds in datasets):
        return f"modality {modality}, not CT"
    image_type_problem = _image_type_problem(datasets)
    if image_type_problem is not None:
        return image_type_problem
    multiframe = sop_classes == {ENHANCED_CT_IMAGE_STORAGE}
    if multiframe and len(datasets) > 1:
        return f"{len(datasets)} Enhanced CT instances in one series (only one is supported)"
    for ds in datasets:
        orientation = _orientation(ds)
        if orientation is None:
            return "has no ImageOrientationPatient"
        if not _is_axial(orientation, orientation_tol_deg):
            return "not axial"
    count = _slice_count(datasets, multiframe=multiframe)
    if count < min_slices:
        return f"only {count} slices < {min_slices}"
    return None


def _image_type_problem(datasets: list[Dataset]) -> str | None:
    for ds in datasets:
        values = [str(v).upper() for v in _as_list(ds.get("ImageType", []))]
        if "LOCALIZER" in values:
            return "LOCALIZER"
        if not values or values[0] != "ORIGINAL":
            return f"{values[0] if values else 'no ImageType'}, not ORIGINAL"
    return None


def _as_list(value: object) -> list[object]:
    if isinstance(value, str | bytes):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    return [value]


def _functional_group_value(ds: Dataset, sequence: str, keyword: str) -> object | None:
    """An attribute of an Enhanced CT functional group (shared first, then the first frame)."""
    for groups_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if not groups:
            continue
        items = groups[0].get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def _orientation(ds: Dataset) -> list[float] | None:
    value = ds.get("ImageOrientationPatient")
    if value is None:
        value = _functional_group_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    if value is None:
        return None
    values = _floats(value)
    return values if len(values) == 6 else None


def _floats(value: object) -> list[float]:
    return [float(cast(SupportsFloat, v)) for v in _as_list(value)]


def _is_axial(orientation: Sequence[float], tol_deg: float) -> bool:
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:], dtype=float)
    limit = math.cos(math.radians(tol_deg))
    row_ok = abs(row[0]) / max(np.linalg.norm(row), 1e-9) >= limit
    col_ok = abs(col[1]) / max(np.linalg.norm(col), 1e-9) >= limit
    return bool(row_ok and col_ok)


def _slice_count(datasets: list[Dataset], *, multiframe: bool) -> int:
    if multiframe:
        return int(datasets[0].get("NumberOfFrames", 1))
    return len(datasets)


def _slice_thickness(ds: Dataset) -> float | None:
    value = ds.get("SliceThickness")
    if value is None:
        value = _functional_group_value(ds, "PixelMeasuresSequence", "SliceThickness")
    try:
        return float(cast(SupportsFloat, value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _kernel(ds: Dataset) -> str:
    value = ds.get("ConvolutionKernel")
    if value is None:
        value = _functional_group_value(ds, "CTReconstructionSequence", "ConvolutionKernel")
    if value is None:
        return ""
    return "\\".join(str(v) for v in _as_list(value))


def _is_sharp_kernel(kernel: str) -> bool:
    return any(_SHARP_KERNEL.search(part.strip()) for part in kernel.split("\\"))


def _as_selected(series_uid: str, members: list[tuple[Path, Dataset]]) -> SelectedSeries:
    datasets = [ds for _, ds in members]
    first = datasets[0]
    multiframe = str(first.get("SOPClassUID", "")) == ENHANCED_CT_IMAGE_STORAGE
    return SelectedSeries(
        series_uid=series_uid,
        paths=tuple(path for path, _ in members),
        headers=tuple(datasets),
        slice_count=_slice_count(datasets, multiframe=multiframe),
        slice_thickness=_slice_thickness(first),
        kernel=_kernel(first),
        multiframe=multiframe,
    )


def _preference(series: SelectedSeries) -> tuple[float, int, int, str]:
    """Sort key, smallest first: thinnest, then sharp kernel, then most slices, then UID."""
    thickness = series.slice_thickness if series.slice_thickness is not None else math.inf
    return (
        round(thickness, 2),
        0 if _is_sharp_kernel(series.kernel) else 1,
        -series.slice_count,
        series.series_uid,
    )
