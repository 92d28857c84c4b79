"""Turn the chosen series into a volume in Hounsfield units, in table order, or say why not.

The study probability is a trimmed mean over slices in table order, so the order and the
completeness of the stack matter: a missing slice or a mixed-up series silently shifts which
slices are trimmed. Every geometric assumption is therefore checked and a failure raises
:class:`NotApplicable` naming the rule. Ordering and spacing regularity come from highdicom's
volume geometry (``get_volume_positions``) rather than from a hand-written sort on one
coordinate.

The header of each slice (without pixel data) and its SOP Instance UID are kept in the same order,
because the SR image library and the secondary captures reference them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, SupportsFloat, cast

import numpy as np
import numpy.typing as npt
import pydicom
from highdicom.spatial import get_volume_positions
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from hrct_triage.worker.method.native_pixels import read_native_pixels
from hrct_triage.worker.method.results import NotApplicable
from hrct_triage.worker.method.series import SelectedSeries

__all__ = ["DEFAULT_SPACING_RTOL", "CTVolume", "load_volume"]

log = logging.getLogger(__name__)

# Slice spacing may vary by 10% of the mean spacing: enough for DS rounding and helical
# reconstruction jitter, too little to hide one missing slice in a thin-section stack.
DEFAULT_SPACING_RTOL = 0.1
# Direction cosines and pixel spacings of the slices of one volume agree to this tolerance.
_ORIENTATION_ATOL = 1e-3
_PIXEL_SPACING_RTOL = 1e-3


@dataclass(frozen=True)
class CTVolume:
    """A CT series as HU voxels, superior to inferior (head to feet), with per-slice identity.

    ``hu`` is (slices, rows, columns) float32. ``headers[i]``, ``sop_instance_uids[i]`` and, for
    an Enhanced CT instance, ``frame_numbers[i]`` (1-based) describe slice ``i``. ``headers`` hold
    no pixel data; for Enhanced CT every slice shares the one multi-frame header.
    """

    series_uid: str
    hu: npt.NDArray[np.float32]
    headers: tuple[Dataset, ...]
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int, ...] | None
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    slice_spacing: float  # mm

    @property
    def shape(self) -> tuple[int, int, int]:
        slices, rows, columns = self.hu.shape
        return int(slices), int(rows), int(columns)


def load_volume(series: SelectedSeries, *, spacing_rtol: float = DEFAULT_SPACING_RTOL) -> CTVolume:
    """Read, check and stack the series' pixel data as HU; raise NotApplicable on bad geometry."""
    if spacing_rtol <= 0:
        raise ValueError(f"spacing_rtol must be > 0, got {spacing_rtol}")
    if series.multiframe:
        return _load_enhanced(series, spacing_rtol=spacing_rtol)
    return _load_single_frames(series, spacing_rtol=spacing_rtol)


# --- single-frame CT Image Storage -------------------------------------------------------------


def _load_single_frames(series: SelectedSeries, *, spacing_rtol: float) -> CTVolume:
    uid = series.series_uid
    headers = list(series.headers)
    _check_same_value(uid, [ds.get("FrameOfReferenceUID") for ds in headers], "frame of reference")
    _check_same_value(uid, [(ds.get("Rows"), ds.get("Columns")) for ds in headers], "image size")
    orientation = _check_orientations(uid, [ds.get("ImageOrientationPatient") for ds in headers])
    pixel_spacing = _check_pixel_spacings(uid, [ds.get("PixelSpacing") for ds in headers])
    if any(ds.get("ImagePositionPatient") is None for ds in headers):
        raise NotApplicable(f"series {uid}: an image has no ImagePositionPatient")
    positions = [[float(v) for v in ds.ImagePositionPatient] for ds in headers]
    # get_volume_positions rather than get_series_volume_positions: the orientations are checked
    # above, and the latter's per-header multi-frame check took a third of the load time
    spacing, vol_positions = get_volume_positions(positions, orientation, rtol=spacing_rtol)
    order = _table_order(uid, positions, orientation, spacing, vol_positions, spacing_rtol)
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    hu = np.empty((len(order), rows, columns), dtype=np.float32)
    for out_index, in_index in enumerate(order):
        _read_hu_into(headers[in_index], series.paths[in_index], hu[out_index])
    ordered = tuple(headers[i] for i in order)
    return CTVolume(
        series_uid=uid,
        hu=hu,
        headers=ordered,
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in ordered),
        frame_numbers=None,
        pixel_spacing=pixel_spacing,
        slice_spacing=float(spacing or 0.0),
    )


def _read_hu_into(header: Dataset, path: Path, out: npt.NDArray[np.float32]) -> None:
    """Decode one slice into ``out`` as HU."""
    if int(header.get("SamplesPerPixel", 1)) != 1:
        raise NotApplicable(f"series {header.get('SeriesInstanceUID')}: image is not monochrome")
    pixels = _pixel_array(header, path)
    if pixels.shape != out.shape:
        raise NotApplicable(
            f"series {header.get('SeriesInstanceUID')}: pixel data of "
            f"{header.get('SOPInstanceUID')} has shape {pixels.shape}, header says {out.shape}"
        )
    slope, intercept = _rescale(header)
    # float32 throughout: a Python float would make numpy compute in float64 (~15x slower)
    np.multiply(pixels, np.float32(slope), out=out, dtype=np.float32)
    out += np.float32(intercept)


def _pixel_array(header: Dataset, path: Path) -> npt.NDArray[Any]:
    """The decoded pixels of ``path``, after which ``header`` holds no pixel data.

    ``header`` comes from ``series.read_headers`` with the pixel data left on disk, so decoding
    it reads only the pixel bytes, directly where ``native_pixels`` can. A deflated file is read
    again whole: pydicom's deferred read would seek into the compressed file, not the inflated
    stream it parsed.
    """
    try:
        native = read_native_pixels(header, path)
        if native is not None:
            return native
        deflated = header.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        source = pydicom.dcmread(path) if deflated else header
        return source.pixel_array
    finally:
        if "PixelData" in header:
            del header.PixelData  # the volume's headers hold no pixel data


def _rescale(item: Dataset) -> tuple[float, float]:
    return float(item.get("RescaleSlope", 1.0)), float(item.get("RescaleIntercept", 0.0))


# --- Enhanced CT Image Storage (one multi-frame instance) --------------------------------------


def _load_enhanced(series: SelectedSeries, *, spacing_rtol: float) -> CTVolume:
    uid = series.series_uid
    ds = series.headers[0]
    frames = int(ds.get("NumberOfFrames", 1))
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    if len(per_frame) != frames:
        raise NotApplicable(
            f"series {uid}: {len(per_frame)} per-frame functional groups for {frames} frames"
        )
    if ds.get("FrameOfReferenceUID") is None:
        raise NotApplicable(f"series {uid}: no frame of reference")
    groups = [_FrameGroups(ds, item) for item in per_frame]
    orientation = _check_orientations(
        uid, [g.value("PlaneOrientationSequence", "ImageOrientationPatient") for g in groups]
    )
    pixel_spacing = _check_pixel_spacings(
        uid, [g.value("PixelMeasuresSequence", "PixelSpacing") for g in groups]
    )
    raw_positions = [g.value("PlanePositionSequence", "ImagePositionPatient") for g in groups]
    if any(p is None for p in raw_positions):
        raise NotApplicable(f"series {uid}: a frame has no ImagePositionPatient")
    positions = [_floats(p) for p in raw_positions]
    spacing, vol_positions = get_volume_positions(positions, orientation, rtol=spacing_rtol)
    order = _table_order(uid, positions, orientation, spacing, vol_positions, spacing_rtol)
    pixels = _pixel_array(ds, series.paths[0]).reshape(frames, int(ds.Rows), int(ds.Columns))
    hu = np.empty(pixels.shape, dtype=np.float32)
    for out_index, in_index in enumerate(order):
        slope, intercept = groups[in_index].rescale()
        np.multiply(pixels[in_index], np.float32(slope), out=hu[out_index], dtype=np.float32)
        hu[out_index] += np.float32(intercept)
    return CTVolume(
        series_uid=uid,
        hu=hu,
        headers=tuple(ds for _ in order),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for _ in order),
        frame_numbers=tuple(i + 1 for i in order),
        pixel_spacing=pixel_spacing,
        slice_spacing=float(spacing or 0.0),
    )


class _FrameGroups:
    """Look up a functional-group attribute of one frame: per-frame first, then shared."""

    def __init__(self, ds: Dataset, per_frame_item: Dataset) -> None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        self._items = [per_frame_item, *([shared[0]] if shared else [])]

    def value(self, sequence: str, keyword: str) -> object | None:
        for item in self._items:
            inner = item.get(sequence)
            if inner and keyword in inner[0]:
                return inner[0].get(keyword)
        return None

    def rescale(self) -> tuple[float, float]:
        slope = self.value("PixelValueTransformationSequence", "RescaleSlope")
        intercept = self.value("PixelValueTransformationSequence", "RescaleIntercept")
        return (
            float(cast(SupportsFloat, slope)) if slope is not None else 1.0,
            float(cast(SupportsFloat, intercept)) if intercept is not None else 0.0,
        )


# --- shared geometry checks --------------------------------------------------------------------


def _floats(value: object) -> list[float]:
    """DICOM multi-values (DS/FD) as floats; a single value becomes a one-item list."""
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [float(cast(SupportsFloat, v)) for v in value]
    return [float(cast(SupportsFloat, value))]


def _check_same_value(uid: str, values: Sequence[object], what: str) -> None:
    if any(v is None or v == (None, None) for v in values):
        raise NotApplicable(f"series {uid}: an image has no {what}")
    distinct = {str(v) for v in values}
    if len(distinct) > 1:
        raise NotApplicable(f"series {uid}: more than one {what} ({len(distinct)} different)")


def _check_orientations(uid: str, values: Sequence[object]) -> list[float]:
    if any(v is None for v in values):
        raise NotApplicable(f"series {uid}: an image has no ImageOrientationPatient")
    array = np.asarray([_floats(v) for v in values], dtype=np.float64)
    if array.shape[1] != 6:
        raise NotApplicable(f"series {uid}: ImageOrientationPatient must have 6 values")
    if np.abs(array - array[0]).max() > _ORIENTATION_ATOL:
        raise NotApplicable(f"series {uid}: images differ in orientation")
    return [float(x) for x in array[0]]


def _check_pixel_spacings(uid: str, values: Sequence[object]) -> tuple[float, float]:
    if any(v is None for v in values):
        raise NotApplicable(f"series {uid}: an image has no PixelSpacing")
    array = np.asarray([_floats(v) for v in values], dtype=np.float64)
    if array.shape[1] != 2 or (array <= 0).any():
        raise NotApplicable(f"series {uid}: PixelSpacing must be two positive values")
    if (np.abs(array - array[0]) > _PIXEL_SPACING_RTOL * array[0]).any():
        raise NotApplicable(f"series {uid}: images differ in pixel spacing")
    return float(array[0, 0]), float(array[0, 1])


def _table_order(
    uid: str,
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float],
    spacing: float | None,
    vol_positions: list[int] | None,
    rtol: float,
) -> list[int]:
    """Input indices, superior first; raise NotApplicable with a diagnosis if not a volume."""
    if spacing is None or vol_positions is None or spacing <= 0:
        raise NotApplicable(f"series {uid}: {_spacing_problem(positions, orientation, rtol)}")
    stacked = sorted(range(len(vol_positions)), key=lambda i: vol_positions[i])
    # highdicom's stacking direction depends on the orientation; table order here is superior
    # first (+z in LPS is towards the head), whatever the patient position.
    if positions[stacked[0]][2] < positions[stacked[-1]][2]:
        stacked.reverse()
    return stacked


def _spacing_problem(
    positions: Sequence[Sequence[float]], orientation: Sequence[float], rtol: float
) -> str:
    """Say in words why the slice positions do not form a regularly spaced stack."""
    points = np.asarray(positions, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    distances = np.sort(points @ normal)
    gaps = np.diff(distances)
    if (gaps < 1e-3).any():
        return "duplicate slice positions (two images at the same table position)"
    typical = float(np.median(gaps))
    if gaps.max() > (1 + rtol) * typical or gaps.min() < (1 - rtol) * typical:
        return (
            f"slice spacing not uniform: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm "
            f"around {typical:.3g} mm (missing slices?)"
        )
    return "slices are not stacked along their normal (tilted gantry or mixed stacks?)"
