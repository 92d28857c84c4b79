"""Inputs that must fall outside a chest CT model's domain, made from a phantom study or from
scratch with numpy and pydicom: the thin series with heavy added noise, only its lowest slices
(lung bases and upper abdomen), and a head CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["lung_bases_copy", "noisy_copy", "write_head_ct"]


def _thin_series(study: Path) -> list[Path]:
    return sorted(study.glob("CT_02_*.dcm"))


def noisy_copy(study: Path, out: Path, *, sigma_hu: float, seed: int = 0) -> Path:
    """The study's thin series with white noise of ``sigma_hu`` added (a broken or extreme
    low-dose reconstruction); written to ``out``, which is returned."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for path in _thin_series(study):
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.astype(np.float64)
        slope = float(ds.get("RescaleSlope", 1.0))
        noisy = stored + rng.normal(0.0, sigma_hu / slope, stored.shape)
        info = np.iinfo(ds.pixel_array.dtype)
        ds.PixelData = (
            np.clip(np.round(noisy), info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
        )
        ds.save_as(out / path.name, enforce_file_format=True)
    return out


def lung_bases_copy(study: Path, out: Path, *, keep: int = 22) -> Path:
    """Only the ``keep`` most inferior slices of the study's thin series (the lung bases and
    the upper abdomen under them), as a scan that misses the chest would give."""
    out.mkdir(parents=True, exist_ok=True)
    paths = _thin_series(study)
    heights = [
        float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in paths
    ]
    for index in np.argsort(heights)[:keep]:
        pydicom.dcmread(paths[index]).save_as(out / paths[index].name, enforce_file_format=True)
    return out


def write_head_ct(out: Path, *, slices: int = 30, size: int = 256) -> Path:
    """An axial head CT: skull (1200 HU), brain (35 HU), ventricles (5 HU), frontal sinus air,
    in air; 5 mm slices, 0.9 mm pixels, with scanner-like noise."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    y, x = np.mgrid[:size, :size].astype(np.float64)
    centre = (size - 1) / 2.0
    for k in range(slices):
        scale = 1.0 - 0.6 * abs(k - slices * 0.45) / slices
        r = np.hypot((x - centre) / (0.36 * size * scale), (y - centre) / (0.44 * size * scale))
        hu = np.full((size, size), -1000.0)
        hu[r < 1.0] = 1200.0
        hu[r < 0.92] = 35.0
        ventricle = np.hypot((x - centre) / (0.05 * size), (y - centre) / (0.12 * size)) < 1.0
        hu[ventricle & (r < 0.92)] = 5.0
        sinus = np.hypot((x - centre) / (0.06 * size), (y - centre + 0.4 * size * scale) / 12) < 1
        if k > slices * 0.6:
            hu[sinus] = -950.0
        hu += rng.normal(0.0, 6.0, hu.shape)
        ds = _ct_slice(study, series, frame, k, size)
        ds.PixelData = np.round(hu + 1024.0).clip(0, 4095).astype(np.uint16).tobytes()
        ds.save_as(out / f"HEAD_{k + 1:04d}.dcm", enforce_file_format=True)
    return out


def _ct_slice(study: str, series: str, frame: str, k: int, size: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "HEAD^PHANTOM", "HEAD0001"
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StationName = "HEADSCAN"
    ds.ConvolutionKernel = "H30s"
    ds.SliceThickness = 5.0
    ds.PixelSpacing = [0.9, 0.9]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-0.45 * size, -0.45 * size, -5.0 * k]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1.0
    return ds
