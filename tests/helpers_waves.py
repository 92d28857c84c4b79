"""What a CT scanner sends after the images, built from a phantom study: the late waves.

Each builder writes new DICOM files next to nothing it was given, so a test sends the phantom's
own files first and the late objects afterwards: an X-Ray Radiation Dose SR, a coronal reformat
series, an extra slice of a series, and a changed version of an instance (same SOP Instance UID,
other bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

#: X-Ray Radiation Dose SR Storage, which every modern CT sends when the exam is closed.
DOSE_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.67"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

# Attributes a late object of the same study copies from one of its images.
_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "FrameOfReferenceUID",
)


def series_files(study_dir: Path, prefix: str) -> list[Path]:
    """The phantom's files of one series: ``CT_01`` localizer, ``CT_02`` thin lung series,
    ``CT_03`` thick soft-tissue series."""
    return sorted(study_dir.glob(f"{prefix}_*.dcm"))


def _save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def dose_sr(reference: Path, out: Path) -> Path:
    """A minimal X-Ray Radiation Dose SR (TID 10011 root, one accumulated-dose container) in
    the study of ``reference``, in a series of its own, as a CT sends it at the exam's end."""
    source = pydicom.dcmread(reference, stop_before_pixels=True)
    now = datetime.now(UTC)
    ds = Dataset()
    for keyword in _STUDY_KEYWORDS:
        if keyword in source and keyword != "FrameOfReferenceUID":
            setattr(ds, keyword, source.get(keyword))
    ds.SOPClassUID = DOSE_SR_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 997
    ds.SeriesDescription = "Dose Report"
    ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    ds.Manufacturer = "Phantom"
    ds.ManufacturerModelName = "Phantom CT"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1"
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence(
        [_code("113701", "DCM", "X-Ray Radiation Dose Report")]
    )
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "10011"
    ds.ContentTemplateSequence = DicomSequence([template])
    procedure = Dataset()
    procedure.RelationshipType = "HAS CONCEPT MOD"
    procedure.ValueType = "CODE"
    procedure.ConceptNameCodeSequence = DicomSequence(
        [_code("121058", "DCM", "Procedure reported")]
    )
    procedure.ConceptCodeSequence = DicomSequence([_code("77477000", "SCT", "Computed Tomography")])
    events = Dataset()
    events.RelationshipType = "CONTAINS"
    events.ValueType = "NUM"
    events.ConceptNameCodeSequence = DicomSequence(
        [_code("113812", "DCM", "Total Number of Irradiation Events")]
    )
    measured = Dataset()
    measured.NumericValue = "1"
    measured.MeasurementUnitsCodeSequence = DicomSequence([_code("{events}", "UCUM", "events")])
    events.MeasuredValueSequence = DicomSequence([measured])
    accumulated = Dataset()
    accumulated.RelationshipType = "CONTAINS"
    accumulated.ValueType = "CONTAINER"
    accumulated.ConceptNameCodeSequence = DicomSequence(
        [_code("113811", "DCM", "CT Accumulated Dose Data")]
    )
    accumulated.ContinuityOfContent = "SEPARATE"
    accumulated.ContentSequence = DicomSequence([events])
    ds.ContentSequence = DicomSequence([procedure, accumulated])
    return _save(ds, out / "dose_sr.dcm")


def coronal_reformat(thin: Sequence[Path], out: Path, *, images: int = 24) -> list[Path]:
    """A coronal multiplanar reformat of the thin series, as a scanner's MPR job sends it:
    ImageType DERIVED\\SECONDARY\\REFORMATTED, orientation 1\\0\\0\\0\\0\\-1, ``images`` planes
    (enough slices that only its type and orientation keep series selection from it)."""
    slices = [pydicom.dcmread(path) for path in thin]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]), reverse=True)
    volume = np.stack([ds.pixel_array for ds in slices])  # z (head first), y, x
    first = slices[0]
    spacing_z = abs(
        float(slices[0].ImagePositionPatient[2]) - float(slices[1].ImagePositionPatient[2])
    )
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    series_uid = generate_uid()
    rows = np.linspace(0, volume.shape[1] - 1, images + 2)[1:-1].astype(int)
    written = []
    for number, y in enumerate(rows, start=1):
        ds = pydicom.dcmread(thin[0], stop_before_pixels=True)
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 301
        ds.SeriesDescription = "CHEST COR MPR"
        ds.InstanceNumber = number
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        x0, y0, _ = (float(v) for v in first.ImagePositionPatient)
        ds.ImagePositionPatient = [x0, y0 + y * row_spacing, float(first.ImagePositionPatient[2])]
        ds.PixelSpacing = [spacing_z, column_spacing]
        plane = np.ascontiguousarray(volume[:, y, :])
        ds.Rows, ds.Columns = plane.shape
        ds.PixelData = plane.astype(first.pixel_array.dtype).tobytes()
        ds["PixelData"].VR = "OW"
        if "SliceLocation" in ds:
            del ds.SliceLocation  # a coronal plane has no table position
        written.append(_save(ds, out / f"MPR_{number:04d}.dcm"))
    return written


def extra_slice(series: Sequence[Path], out: Path) -> Path:
    """One more image of a series (a new SOP Instance UID one slice past its last), as a scanner
    sends a slice it had left out."""
    slices = [pydicom.dcmread(path) for path in series]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    last, before = slices[0], slices[1]
    step = float(last.ImagePositionPatient[2]) - float(before.ImagePositionPatient[2])
    ds = last
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = max(int(s.InstanceNumber) for s in slices) + 1
    position = [float(v) for v in last.ImagePositionPatient]
    ds.ImagePositionPatient = [position[0], position[1], position[2] + step]
    if "SliceLocation" in ds:
        ds.SliceLocation = position[2] + step
    return _save(ds, out / "extra_slice.dcm")


def changed_version(path: Path, out: Path) -> Path:
    """The same instance (same SOP Instance UID) with other pixel values: a scanner's
    corrected resend."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[: pixels.shape[0] // 8] = pixels.min()
    ds.PixelData = pixels.tobytes()
    return _save(ds, out / f"changed_{path.name}")
