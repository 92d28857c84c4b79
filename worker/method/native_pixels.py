"""Uncompressed 16-bit CT pixels read straight from the file, without pydicom's decoder.

``Dataset.pixel_array`` spends ~0.4 ms per slice beyond the read itself (decoder and plugin
lookup, option validation, converting a dozen header elements), which was half of loading a
300-slice series. In the common case - little-endian uncompressed, one sample, 16 bits allocated
and 16 stored - the pixel bytes *are* the array, and ``series.read_headers`` left the Pixel Data
on disk with its file offset recorded, so one ``np.fromfile`` there gives the array pydicom
would. Everything else (compressed or deflated syntaxes, other bit depths, BitsStored < 16, which
pydicom sign-corrects, a length that does not match the matrix, a short file) is declined with
``None`` and goes through pydicom as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = ["read_native_pixels"]

_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_NATIVE_LITTLE_ENDIAN = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def read_native_pixels(header: Dataset, path: Path) -> npt.NDArray[Any] | None:
    """The (rows, columns) pixels of a single-frame slice, or None where pydicom must decode.

    ``header`` is read with its Pixel Data deferred (or small enough to be held); the values
    returned are those of ``header.pixel_array``: int16 for PixelRepresentation 1, else uint16.
    """
    dtype = _native_dtype(header)
    if dtype is None:
        return None
    rows, columns = int(header.Rows), int(header.Columns)
    element = header.get_item(_PIXEL_DATA, keep_deferred=True)
    if not isinstance(element, RawDataElement) or element.length != rows * columns * 2:
        return None
    if element.value is not None:
        pixels = np.frombuffer(element.value, dtype=dtype)
    elif element.value_tell is not None:
        pixels = np.fromfile(path, dtype=dtype, count=rows * columns, offset=element.value_tell)
    else:
        return None
    if pixels.size != rows * columns:
        return None  # a short file: let pydicom say what is wrong
    return pixels.reshape(rows, columns)


def _native_dtype(header: Dataset) -> np.dtype[Any] | None:
    """The little-endian dtype of the pixels if the shortcut applies, else None."""
    meta = getattr(header, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN:
        return None
    if int(header.get("NumberOfFrames", 1) or 1) != 1:
        return None
    if int(header.get("SamplesPerPixel", 1)) != 1:
        return None
    if header.get("BitsAllocated") != 16 or header.get("BitsStored") != 16:
        return None
    if header.get("Rows") is None or header.get("Columns") is None:
        return None
    representation = header.get("PixelRepresentation")
    if representation not in (0, 1):
        return None
    return np.dtype("<i2" if representation == 1 else "<u2")
