"""A fake axial chest CT series and a finished analysis made by hand: outputs without torch or
a model."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from hrct_triage.worker.method.results import HeatMap, ModelInfo, SliceResult, StudyAnalysis

WHEN = datetime(2024, 3, 4, 11, 12, 13, 141516)
SLICES = 25
MATRIX = 64


def _ct_header(study: dict[str, str], index: int, size: int) -> Dataset:
    """One axial CT slice header with the attributes a scanner would send."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate, ds.StudyTime = "20240304", "101500"
    ds.SeriesDate, ds.SeriesTime = "20240304", "101600"
    ds.AccessionNumber, ds.StudyID = "ACC0042", "42"
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "CT", "Phantom CT Co", "Fake 64"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.PatientName, ds.PatientID = "Doe^Jane", "PAT-0001"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyInstanceUID = study["study"]
    ds.SeriesInstanceUID = study["series"]
    ds.FrameOfReferenceUID = study["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 3, index + 1, 1
    ds.BodyPartExamined, ds.PatientPosition = "CHEST", "HFS"
    ds.ImagePositionPatient = [-160.0, -160.0, -5.0 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness, ds.PixelSpacing, ds.KVP = 5.0, [320 / size, 320 / size], 120
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    return ds


def _chest_hu(size: int) -> np.ndarray:
    """Body ellipse of soft tissue with two air-filled lungs."""
    hu = np.full((size, size), -1000, np.int16)
    yy, xx = np.mgrid[:size, :size] / size
    hu[((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.45) ** 2 < 1] = 40
    for centre in (0.33, 0.67):
        hu[((yy - 0.5) / 0.3) ** 2 + ((xx - centre) / 0.13) ** 2 < 1] = -850
    return hu


def ct_series(slices: int = SLICES, size: int = MATRIX, *, pixels: bool = True) -> list[Dataset]:
    """A fake axial chest CT series; ``pixels=False`` gives header-only datasets."""
    study: dict[str, str] = {
        "study": generate_uid(),
        "series": generate_uid(),
        "frame": generate_uid(),
    }
    headers = []
    stored = (_chest_hu(size) + 1024).astype(np.int16).tobytes()
    for index in range(slices):
        ds = _ct_header(study, index, size)
        if pixels:
            ds.PixelData = stored
        headers.append(ds)
    return headers


def fake_heatmap(header: Dataset, probability: float) -> HeatMap:
    """Lung window of the fake slice and a blob of activation in the right lung."""
    size = int(header.Rows)
    lung_window = np.clip((_chest_hu(size) + 1200) / 1200, 0, 1).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] / size
    cam = np.exp(-(((yy - 0.45) / 0.12) ** 2 + ((xx - 0.3) / 0.1) ** 2)).astype(np.float32)
    return HeatMap(header.SOPInstanceUID, 0.05, probability, lung_window, cam)


def make_model(version: str = "0.1.0+phantom.untrained", sha256: str = "ab" * 32) -> ModelInfo:
    """Model metadata as the demo checkpoint carries it."""
    return ModelInfo(
        name="hrct-triage DenseNet-121",
        version=version,
        sha256=sha256,
        untrained=True,
        trained_on="synthetic phantoms",
    )


def make_analysis(
    headers: Sequence[Dataset],
    *,
    positive: bool = True,
    model: ModelInfo | None = None,
    heatmaps: int = 2,
) -> StudyAnalysis:
    """A finished analysis by hand: every slice analysed, 10% trimmed at each end."""
    probability = 0.93 if positive else 0.12
    uids = [ds.SOPInstanceUID for ds in headers]
    trim = max(1, len(uids) // 10)
    return StudyAnalysis(
        study_uid=headers[0].StudyInstanceUID,
        series_uid=headers[0].SeriesInstanceUID,
        probability=probability,
        threshold=0.8,
        positive=positive,
        slices=[SliceResult(uid, probability) for uid in uids],
        kept=uids[trim:-trim],
        heatmaps=[fake_heatmap(ds, probability) for ds in headers[10 : 10 + heatmaps]],
        model=model or make_model(),
    )


def by_uid(headers: Sequence[Dataset]) -> dict[str, Dataset]:
    """Headers keyed by SOP Instance UID, as build_heatmap_scs takes them."""
    return {ds.SOPInstanceUID: ds for ds in headers}
