"""The CT Image attributes a single-frame series shares (study, acquisition, geometry, padding),
and the stored values of its pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from hrct_triage.phantoms.encoders import Syntax, decimal_string
from hrct_triage.phantoms.geometry import Grid
from hrct_triage.phantoms.identity import STUDY_DATE, Identity, patient_study

Mask = NDArray[np.bool_]
PADDING = -2000  # GE-like Pixel Padding Value outside the reconstruction circle (signed pixels)


@dataclass(frozen=True)
class Series:
    """One series of the study as the scanner reconstructs it: header values and look."""

    number: int
    description: str
    kernel: str
    thickness: float | None
    image_type: str  # "AXIAL" or "LOCALIZER"
    window: tuple[float, float]  # centre, width
    offset_s: float  # seconds after the study started


def ct_series_dataset(ids: Identity, series: Series, uid: str, *, signed: bool) -> Dataset:
    """Everything of a CT image that is the same across one series; ``signed`` pixels are
    16-bit signed (GE-like), others 12-bit unsigned."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    patient_study(ds, ids)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.SeriesDate = STUDY_DATE
    ds.SeriesTime = ids.time(series.offset_s)
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.ProtocolName = "Chest HRCT"
    ds.FrameOfReferenceUID = ids.uid("frame")
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", series.image_type]
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = STUDY_DATE
    ds.AcquisitionTime = ids.time(series.offset_s)
    ds.ContentDate = STUDY_DATE
    ds.ContentTime = ids.time(series.offset_s + 30)
    ds.InstanceCreationDate = STUDY_DATE
    ds.InstanceCreationTime = ids.time(series.offset_s + 30)
    _ct_acquisition(ds, series)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    if series.image_type != "LOCALIZER":  # a scout's values are no Hounsfield units
        ds.RescaleType = "HU"
    ds.WindowCenter = decimal_string(series.window[0])
    ds.WindowWidth = decimal_string(series.window[1])
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    return ds


def _ct_acquisition(ds: Dataset, series: Series) -> None:
    localizer = series.image_type == "LOCALIZER"
    ds.ScanOptions = "SURVIEW" if localizer else "HELICAL MODE"
    ds.KVP = "120"
    ds.XRayTubeCurrent = 30 if localizer else 180
    ds.ExposureTime = 1500 if localizer else 500
    ds.Exposure = 45 if localizer else 90
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = 22 if localizer else 24
    ds.FocalSpots = "1.2"
    ds.DataCollectionDiameter = "500"
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ConvolutionKernel = series.kernel
    if series.thickness is not None:
        ds.SliceThickness = decimal_string(series.thickness)
    else:
        ds.SliceThickness = None
    if not localizer:
        ds.RevolutionTime = 0.5
        ds.SingleCollimationWidth = 0.625
        ds.TotalCollimationWidth = 40.0
        ds.TableSpeed = 80.0
        ds.TableFeedPerRotation = 40.0
        ds.SpiralPitchFactor = 1.0
        ds.CTDIvol = 6.5
        phantom = Dataset()
        phantom.CodeValue = "113691"
        phantom.CodingSchemeDesignator = "DCM"
        phantom.CodeMeaning = "IEC Body Dosimetry Phantom"
        ds.CTDIPhantomTypeCodeSequence = [phantom]


def axial_plane(ds: Dataset, grid: Grid) -> None:
    """Geometry shared by every image of an axial series."""
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [decimal_string(grid.spacing), decimal_string(grid.spacing)]
    ds.ReconstructionDiameter = decimal_string(grid.spacing * grid.n)
    ds.Rows, ds.Columns = grid.shape


def axial_image(uid: str, grid: Grid, z: float, instance: int) -> Dataset:
    """What differs from image to image of an axial series (pixel data aside)."""
    own = Dataset()
    own.SOPInstanceUID = uid
    own.InstanceNumber = instance
    corner = decimal_string(float(grid.coords[0]))
    own.ImagePositionPatient = [corner, corner, decimal_string(z)]
    own.SliceLocation = decimal_string(z)
    return own


def declare_padding(ds: Dataset, grid: Grid, syntax: Syntax, *, signed: bool) -> Mask | None:
    """Declare GE-like padding outside the reconstruction circle; where it goes (signed only).

    Near-lossless compression moves the padding by up to NEAR, so a lossy syntax declares a
    padding range (value and range limit) around it instead of one value.
    """
    if not signed:
        return None
    outside = outside_circle(grid)
    spread = syntax.jls_error
    ds.add_new(0x00280120, "SS", PADDING - spread)  # Pixel Padding Value
    if spread:
        ds.add_new(0x00280121, "SS", PADDING + spread)  # Pixel Padding Range Limit
    return outside


def outside_circle(grid: Grid) -> Mask:
    """Pixels outside the reconstruction circle (the image's inscribed circle)."""
    x, y = grid.xy()
    radius = grid.n / 2.0 * grid.spacing
    return np.asarray(x**2 + y**2 > radius**2)


def stored_pixels(hu: NDArray[Any], *, signed: bool, outside: Mask | None = None) -> bytes:
    """Stored values for HU = stored - 1024: 12-bit unsigned, or GE-like signed 16-bit with
    the padding value outside the reconstruction circle."""
    stored = np.clip(np.rint(hu) + 1024.0, 0.0, 4095.0)
    if not signed:
        return stored.astype("<u2").tobytes()
    out = stored.astype("<i2")
    if outside is not None:
        out[outside] = PADDING
    return out.tobytes()
