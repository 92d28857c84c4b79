"""A study with no CT at all (Secondary Captures of a radiograph-like projection).

The gateway must keep such a study but mark it ``not_applicable``; this one lets tests prove it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from hrct_triage.phantoms.encoders import save_file
from hrct_triage.phantoms.generator import draw_body, frontal_projection
from hrct_triage.phantoms.identity import STUDY_DATE, Identity, patient_study


def write_non_ct_study(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a study with no CT at all and return its folder.

    Three Secondary Capture images of a chest X-ray-like projection: the gateway must keep such a
    study but mark it ``not_applicable`` because it has no axial CT series to analyse.
    """
    rng = np.random.default_rng([seed, 7, 0])
    body = draw_body(int(rng.integers(1 << 31)), label="healthy", findings=())
    ids = Identity.make(seed=seed, label="nonct", index=1, rng=rng)
    folder = out_dir / f"non_ct_{seed:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    picture = frontal_projection(body, width_mm=400.0, height_mm=400.0, top_depth=-90.0)
    series_uid = ids.uid("series", 1)
    for number in (1, 2, 3):
        gamma = (1.0, 0.8, 1.25)[number - 1]
        pixels = _to_uint8(picture, gamma=gamma)
        ds = _sc_dataset(ids, series_uid=series_uid, instance=number, pixels=pixels)
        save_file(ds, folder / f"SC_01_{number:04d}.dcm")
    return folder


def _sc_dataset(
    ids: Identity, *, series_uid: str, instance: int, pixels: NDArray[np.uint8]
) -> Dataset:
    """A Secondary Capture of a chest radiograph-like picture (no CT in the study)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ids.uid("sc", instance)
    patient_study(ds, ids)
    ds.StudyDescription = "XR CHEST"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Chest radiograph capture"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = instance
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ContentDate = STUDY_DATE
    ds.ContentTime = ids.time(60.0 * instance)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = pixels.tobytes()
    return ds


def _to_uint8(projection: NDArray[np.floating[Any]], *, gamma: float) -> NDArray[np.uint8]:
    scaled = np.clip(projection / max(float(projection.max()), 1e-6), 0.0, 1.0) ** gamma
    return np.round(scaled * 255.0).astype(np.uint8)
