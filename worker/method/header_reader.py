"""The header of a CT file as ``pydicom.dcmread(path, defer_size=...)`` gives it, read faster.

Series selection reads every file of a study (361 for a 300-slice phantom study) and
``dcmread`` spent ~0.4 ms on each: a generator step, a ``tell`` and two ``read`` calls per
element, then a second pass over the file meta. The common file is plain: a preamble, file meta,
and a little-endian data set (implicit VR, or explicit VR as every compressed syntax is) whose
elements all have defined lengths. Such a file is read here in one or two ``read`` calls and
walked with ``struct``, giving the same :class:`~pydicom.dataset.FileDataset`: the same raw
elements (tag, VR, length, value bytes, file offset), the same deferred values (left on disk,
read by pydicom on first access), file meta, preamble and encoding. Values are decoded later by
pydicom, as before.

Anything else returns None and the caller reads the file with pydicom: no preamble, no or an
unusual transfer syntax (deflate, big endian, private), a command set, an undefined length
(sequences and encapsulated pixel data are parsed by pydicom), an unknown VR, elements out of
order, a file that ends inside an element. tests/test_header_reader.py holds both readers equal
on phantom studies of every transfer syntax.
"""

from __future__ import annotations

import os
import struct
from collections.abc import MutableSequence
from pathlib import Path
from typing import BinaryIO, cast

from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.dataelem import (
    DataElement,
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import VR

from hrct_triage.common.dicom_elements import ElementWalker, MalformedDataSet

__all__ = ["read_file_header"]

# One read takes the header of a usual CT file (a few KiB) and little of its pixel data.
_FIRST_READ = 16 * 1024
_PREAMBLE = 128
_SPECIFIC_CHARACTER_SET = 0x00080005
# The VR's text by its bytes in explicit VR; None (implicit VR) stands for itself.
_VR_TEXT: dict[bytes | None, str | None] = {
    vr.value.encode("ascii"): str(vr.value) for vr in VR if len(vr.value) == 2
}
_VR_TEXT[None] = None
_UNKNOWN_VR = "unknown"
_DEFAULT_ENCODING = "iso8859"  # pydicom's default_encoding, the file meta's character set


class _Unusual(Exception):
    """The file is one pydicom must read (see the module docstring)."""


def read_file_header(path: Path, *, defer_size: int) -> FileDataset | None:
    """``dcmread(path, defer_size=defer_size)``, or None where pydicom must read the file.

    Raises OSError as ``open`` does; a file that is not DICOM gives None (pydicom then says so).
    """
    if config.debugging:
        return None  # pydicom would log each element
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        try:
            return _HeaderFile(file, size).dataset(str(path), defer_size)
        except _Unusual:
            return None


class _HeaderFile:
    """A file read for its header: its first bytes, and further ones only where an element that
    is not deferred lies beyond them."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self._size = size
        self._walker = ElementWalker(
            self._read_at(0, _FIRST_READ), size=size, read_at=self._read_at
        )

    def dataset(self, filename: str, defer_size: int) -> FileDataset:
        first = self._walker.data
        if len(first) < _PREAMBLE + 4 or first[_PREAMBLE : _PREAMBLE + 4] != b"DICM":
            raise _Unusual
        preamble = first[:_PREAMBLE]
        meta_elements, pos = self._elements(_PREAMBLE + 4, False, None, meta=True)
        file_meta = FileMetaDataset(meta_elements)
        file_meta.set_original_encoding(False, True, _DEFAULT_ENCODING)
        if meta_elements:  # as pydicom: the first file meta element is decoded while reading
            file_meta[next(iter(meta_elements))]
        implicit = self._syntax_is_implicit(file_meta, pos)
        elements, _ = self._elements(pos, implicit, defer_size, meta=False)
        # from here on, what pydicom's read_dataset and read_partial do with the elements
        dataset = Dataset(elements, parent_encoding=_DEFAULT_ENCODING)
        encoding: str | MutableSequence[str] = _DEFAULT_ENCODING
        charset = elements.get(BaseTag(_SPECIFIC_CHARACTER_SET))
        if charset is not None:
            value = convert_raw_data_element(cast(RawDataElement, charset)).value
            encoding = convert_encodings(cast(str | MutableSequence[str] | None, value))
        dataset.set_original_encoding(implicit, True, encoding)
        result = FileDataset(filename, dataset, preamble, file_meta, implicit, True)
        result.set_original_encoding(implicit, True, dataset._character_set)
        return result

    def _syntax_is_implicit(self, file_meta: FileMetaDataset, pos: int) -> bool:
        """Implicit VR or not, from the Transfer Syntax UID, as ``pydicom.read_partial``."""
        syntax = file_meta.get("TransferSyntaxUID")
        if syntax is None:
            raise _Unusual
        if syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
            raise _Unusual
        if syntax in PrivateTransferSyntaxes:
            raise _Unusual
        implicit = syntax == ImplicitVRLittleEndian
        # pydicom's check of the first element: a VR where none is expected, or none where
        # one is, makes it switch with a warning
        if pos + 8 > self._size:
            raise _Unusual  # an empty data set: pydicom then assumes implicit VR
        data, start = self._walker.window(pos, 6)
        head = data[pos - start : pos - start + 6]
        if struct.unpack_from("<H", head)[0] == 0x0000:
            raise _Unusual  # a command set, read by pydicom in implicit VR
        looks_implicit = not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)
        if looks_implicit != implicit:
            raise _Unusual
        return implicit

    def _elements(
        self, pos: int, implicit: bool, defer_size: int | None, *, meta: bool
    ) -> tuple[dict[BaseTag, DataElement | RawDataElement], int]:
        """Raw elements from ``pos`` to the end (or, for ``meta``, the end of group 0002)."""
        walker = self._walker
        try:
            found, stop = walker.elements(
                pos, implicit=implicit, group=0x0002 if meta else None, undefined=False
            )
        except MalformedDataSet:
            raise _Unusual from None
        elements: dict[BaseTag, DataElement | RawDataElement] = {}
        deferred = self._size + 1 if defer_size is None else defer_size
        vr_texts = _VR_TEXT
        data, start = walker.data, walker.start
        held = start + len(data)
        for tag, vr, length, value_pos in found:
            vr_text = vr_texts.get(vr, _UNKNOWN_VR)
            if vr_text is _UNKNOWN_VR or tag >> 16 == 0xFFFE:
                raise _Unusual  # a VR pydicom does not know, or an item outside a sequence
            value: bytes | None
            if length > deferred and tag != _SPECIFIC_CHARACTER_SET:
                value = None
            elif length == 0:
                value = cast(bytes | None, empty_value_for_VR(vr_text, raw=True))
            else:
                end = value_pos + length
                if value_pos < start or end > held:
                    data, start = walker.window(value_pos, length)
                    held = start + len(data)
                value = data[value_pos - start : end - start]
            key = BaseTag(tag)
            elements[key] = RawDataElement(key, vr_text, length, value, value_pos, implicit, True)
        return elements, stop

    def _read_at(self, pos: int, count: int) -> bytes:
        self._file.seek(pos)
        return self._file.read(max(count, _FIRST_READ))
