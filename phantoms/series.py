"""Writing a study's CT series: the localizer, the thin lung series, the thick soft-tissue one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from hrct_triage.phantoms.ct_image import (
    Series,
    axial_image,
    axial_plane,
    ct_series_dataset,
    declare_padding,
    stored_pixels,
)
from hrct_triage.phantoms.encoders import SeriesWriter, Syntax, decimal_string, save_file
from hrct_triage.phantoms.generator import Body, Phantom, StudySpec, frontal_projection
from hrct_triage.phantoms.geometry import Grid
from hrct_triage.phantoms.identity import Identity
from hrct_triage.phantoms.options import MATRIX, Acquisition

THIN = Series(2, "CHEST 1.0 LUNG", "LUNG", 1.0, "AXIAL", (-600.0, 1200.0), 40.0)
# soft-tissue kernel on 5 mm: smoother, less noise
THICK = Series(3, "CHEST 5.0 STANDARD", "STANDARD", 5.0, "AXIAL", (40.0, 400.0), 40.0)
SCOUT = Series(1, "Topogram 0.6 T20s", "T20s", None, "LOCALIZER", (1800.0, 3000.0), 0.0)

THICK_SUB_MM = 5.0
"""Thin renders per thick slice are one per this many mm: the thick series is never analysed,
so each of its slices is one render whose tubes and sheets carry the 5 mm partial volume
analytically, rather than four thin renders averaged (a quarter of the cost)."""
LOCALIZER_MM = 420.0  # width and height the localizer covers
LOCALIZER_TOP_DEPTH = -80.0  # mm below the lung apex of the localizer's top edge (above it)


def thin_series(acquisition: Acquisition) -> Series:
    """The thin series as ``acquisition`` reconstructs it (THIN itself for the defaults)."""
    mm = acquisition.thickness
    shown = f"{mm:.1f}" if mm == round(mm) else decimal_string(mm)
    return replace(
        THIN,
        description=f"CHEST {shown} {acquisition.kernel}",
        kernel=acquisition.kernel,
        thickness=mm,
    )


def thin_spec(acquisition: Acquisition, slices: int) -> StudySpec:
    """What the generator renders for the thin series."""
    return StudySpec(
        slices=slices,
        thickness=acquisition.thickness,
        matrix=acquisition.matrix,
        pixel_spacing=acquisition.pixel_spacing,
        kernel=acquisition.physics,
        noise_sd=acquisition.noise_sd,
    )


def thick_count(slices: int) -> int:
    """Slices of the thick series of a study whose thin series has ``slices``."""
    return max(8, round(slices / 5))


def thick_spec(slices: int, matrix: int) -> StudySpec:
    """What the generator renders for the thick soft-tissue series."""
    assert THICK.thickness is not None
    return StudySpec(
        slices=thick_count(slices),
        thickness=THICK.thickness,
        matrix=matrix,
        kernel="STANDARD",
        sub_mm=THICK_SUB_MM,
    )


def write_axial_series(
    folder: Path,
    phantom: Phantom,
    ids: Identity,
    series: Series,
    *,
    signed: bool,
    syntax: Syntax,
    variant: tuple[str, ...] = (),
) -> list[str]:
    """Write one generated axial series as single-frame images; returns their SOP Instance UIDs
    in table order (apex first)."""
    grid = Grid(phantom.hu.shape[-1], phantom.pixel_spacing)
    shared = ct_series_dataset(
        ids, series, ids.uid("series", series.number, *variant), signed=signed
    )
    axial_plane(shared, grid)
    outside = declare_padding(shared, grid, syntax, signed=signed)
    writer = SeriesWriter(shared, syntax)
    uids: list[str] = []
    for k, z in enumerate(phantom.z):
        uid = ids.uid("image", series.number, k + 1, *variant)
        own = axial_image(uid, grid, float(z), k + 1)
        path = folder / f"CT_{series.number:02d}_{k + 1:04d}.dcm"
        writer.write(path, own, [stored_pixels(phantom.hu[k], signed=signed, outside=outside)])
        uids.append(uid)
    return uids


def write_localizer(
    folder: Path,
    body: Body,
    ids: Identity,
    *,
    signed: bool,
    syntax: Syntax | None = None,
    variant: tuple[str, ...] = (),
) -> None:
    """A frontal scout image of the study's patient, as the scanner sends first."""
    width = height = LOCALIZER_MM
    top = -LOCALIZER_TOP_DEPTH  # DICOM z of the top edge: the apex is at z = 0
    proj = frontal_projection(
        body, width_mm=width, height_mm=height, top_depth=LOCALIZER_TOP_DEPTH, size=MATRIX
    )
    ds = ct_series_dataset(ids, SCOUT, ids.uid("series", SCOUT.number, *variant), signed=signed)
    sop_instance_uid = ids.uid("image", SCOUT.number, 1, *variant)
    ds.InstanceNumber = 1
    col, row = width / MATRIX, height / MATRIX
    ds.ImagePositionPatient = [
        decimal_string(-width / 2 + col / 2),
        "0",
        decimal_string(top - row / 2),
    ]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = [decimal_string(row), decimal_string(col)]
    hu = proj * np.float32(140.0) - np.float32(1024.0)
    ds.Rows, ds.Columns = hu.shape
    path = folder / f"CT_{SCOUT.number:02d}_0001.dcm"
    if syntax is None or syntax.encoder == "native":
        ds.SOPInstanceUID = sop_instance_uid
        ds.PixelData = stored_pixels(hu, signed=signed)
        save_file(ds, path)
        return
    own = Dataset()
    own.SOPInstanceUID = sop_instance_uid
    SeriesWriter(ds, syntax).write(path, own, [stored_pixels(hu, signed=signed)])
