"""The direct pixel read gives what pydicom's pixel_array gives, or declines.

Files are written with pydicom in the test; each is read the way ``series.read_headers`` reads
it (Pixel Data deferred) and compared with a fresh ``dcmread(...).pixel_array``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from hrct_triage.worker.method.native_pixels import read_native_pixels
from hrct_triage.worker.method.series import DEFERRED_VALUE_BYTES


def _write(
    path: Path,
    pixels: np.ndarray,
    *,
    syntax: UID = ExplicitVRLittleEndian,
    bits_stored: int = 16,
    trailing: bool = False,
) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if syntax == RLELossless:
        ds.compress(RLELossless, pixels)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        big = syntax == ExplicitVRBigEndian
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">" if big else "<")).tobytes()
    if trailing:
        ds.add_new(0xFFFCFFFC, "OB", b"\0\0")  # Data Set Trailing Padding after the pixels
    ds.save_as(path, enforce_file_format=True)
    return path


def _header(path: Path) -> Dataset:
    return pydicom.dcmread(path, defer_size=DEFERRED_VALUE_BYTES)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("size", [(8, 6), (256, 200)])  # held in the header / left on disk
def test_same_pixels_as_pydicom(
    tmp_path: Path, dtype: type, syntax: UID, size: tuple[int, int]
) -> None:
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    pixels: np.ndarray = rng.integers(info.min, info.max, size=size, endpoint=True).astype(dtype)
    path = _write(tmp_path / "a.dcm", pixels, syntax=syntax, trailing=True)
    got = read_native_pixels(_header(path), path)
    expected = pydicom.dcmread(path).pixel_array
    assert got is not None
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, pixels)


@pytest.mark.parametrize(
    ("syntax", "bits_stored"),
    [
        (DeflatedExplicitVRLittleEndian, 16),
        (ExplicitVRBigEndian, 16),
        (RLELossless, 16),
        (ExplicitVRLittleEndian, 12),  # pydicom sign-corrects BitsStored < 16
    ],
)
def test_declines_what_pydicom_must_decode(tmp_path: Path, syntax: UID, bits_stored: int) -> None:
    pixels = np.arange(-2000, 2000, 40, dtype=np.int16).reshape(10, 10)
    path = _write(tmp_path / "b.dcm", pixels, syntax=syntax, bits_stored=bits_stored)
    assert read_native_pixels(_header(path), path) is None


def test_declines_a_truncated_file(tmp_path: Path) -> None:
    pixels = np.zeros((300, 300), dtype=np.int16)
    path = _write(tmp_path / "c.dcm", pixels)
    header = _header(path)
    path.write_bytes(path.read_bytes()[:-1000])
    assert read_native_pixels(header, path) is None


def test_declines_a_length_that_does_not_match_the_matrix(tmp_path: Path) -> None:
    pixels = np.zeros((300, 300), dtype=np.int16)
    path = _write(tmp_path / "d.dcm", pixels)
    header = _header(path)
    header.Rows = 299
    assert read_native_pixels(header, path) is None
