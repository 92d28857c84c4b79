"""Writing a study's CT series: the localizer, the thin lung series, the thick soft-tissue one."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from hrct_triage.phantoms.anatomy import Anatomy
from hrct_triage.phantoms.ct_image import (
    Series,
    axial_image,
    axial_plane,
    ct_series_dataset,
    declare_padding,
)
from hrct_triage.phantoms.encoders import SeriesWriter, Syntax, decimal_string, save_file
from hrct_triage.phantoms.geometry import Grid, Mask
from hrct_triage.phantoms.identity import Identity
from hrct_triage.phantoms.options import Options
from hrct_triage.phantoms.rendering import (
    KERNEL_LOOK,
    MATRIX,
    Detail,
    projection,
    render_series,
    stored_pixels,
)

THIN = Series(2, "CHEST 1.0 LUNG", "LUNG", 1.0, "AXIAL", (-600.0, 1200.0), 40.0)


# soft-tissue kernel on 5 mm: smoother, less noise
THICK = Series(
    3, "CHEST 5.0 STANDARD", "STANDARD", 5.0, "AXIAL", (40.0, 400.0), 40.0, blur_passes=4, noise=0.4
)
SCOUT = Series(1, "Topogram 0.6 T20s", "T20s", None, "LOCALIZER", (1800.0, 3000.0), 0.0)


def thin_series(options: Options) -> Series:
    """The thin series as the options reconstruct it (THIN itself for the defaults).

    Quantum noise goes with 1 / sqrt(slice thickness); the kernel sets sharpness and noise.
    """
    look = KERNEL_LOOK[options.kernel]
    mm = options.thickness
    shown = f"{mm:.1f}" if mm == round(mm) else decimal_string(mm)
    return replace(
        THIN,
        description=f"CHEST {shown} {options.kernel}",
        kernel=options.kernel,
        thickness=mm,
        blur_passes=look.blur_passes,
        noise=look.noise / math.sqrt(mm),
    )


def write_axial_series(
    folder: Path,
    anat: Anatomy,
    ids: Identity,
    series: Series,
    *,
    count: int,
    detail: Detail,
    thin: bool,
    syntax: Syntax,
    variant: tuple[str, ...] = (),
) -> tuple[list[str], Mask]:
    """Render and write one axial series; returns its SOP Instance UIDs and lesion masks."""
    grid = Grid.square(MATRIX, anat.pixel_spacing)
    shared = ct_series_dataset(ids, anat, series, ids.uid("series", series.number, *variant))
    axial_plane(shared, grid)
    outside = declare_padding(shared, grid, anat, syntax)
    writer = SeriesWriter(shared, syntax)
    uids: list[str] = []
    masks = np.zeros((count if thin else 0, *grid.shape), dtype=bool)
    for k, z, hu, lesions in render_series(
        anat, grid, count, detail, blur_passes=series.blur_passes, noise=series.noise
    ):
        if thin:
            masks[k] = lesions
        uid = ids.uid("image", series.number, k + 1, *variant)
        own = axial_image(uid, grid, z, k + 1)
        path = folder / f"CT_{series.number:02d}_{k + 1:04d}.dcm"
        writer.write(path, own, [stored_pixels(hu, anat, outside)])
        uids.append(uid)
    return uids, masks


def write_localizer(
    folder: Path,
    anat: Anatomy,
    ids: Identity,
    syntax: Syntax | None = None,
    variant: tuple[str, ...] = (),
) -> None:
    """A frontal scout image, as the scanner sends first."""
    width, height = 420.0, 420.0
    top = anat.z_top + 70.0
    proj = projection(anat, width_mm=width, height_mm=height, z_top=top)
    ds = ct_series_dataset(ids, anat, SCOUT, ids.uid("series", SCOUT.number, *variant))
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
        ds.PixelData = stored_pixels(hu, anat)
        save_file(ds, path)
        return
    own = Dataset()
    own.SOPInstanceUID = sop_instance_uid
    SeriesWriter(ds, syntax).write(path, own, [stored_pixels(hu, anat)])
