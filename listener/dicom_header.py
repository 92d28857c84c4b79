"""The few attributes the listener needs, read straight from the bytes a scanner sent.

Decoding a whole CT data set with pydicom costs more than storing it, and the listener needs only
the UIDs, a few series attributes and the certainty that the data set is whole. So this module
walks the element headers of the top-level data set, keeps the values of ``WANTED`` and skips
every other value by its length. Undefined-length sequences and encapsulated pixel data are
walked item by item only to find where they end. A data set that ends inside an element, or bytes
that are not DICOM at all, raise :class:`MalformedDataSet` before anything is written.
"""

from __future__ import annotations

import struct
import zlib

from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

# Top-level attributes the listener records (and the character set they are encoded in).
WANTED = frozenset(
    {
        0x00080005,  # Specific Character Set
        0x00080016,  # SOP Class UID
        0x00080018,  # SOP Instance UID
        0x00080050,  # Accession Number
        0x00080060,  # Modality
        0x0008103E,  # Series Description
        0x0020000D,  # Study Instance UID
        0x0020000E,  # Series Instance UID
        0x00200011,  # Series Number
    }
)

# PS3.5 7.1.2: these VRs have a 2-byte reserved field and a 4-byte length in explicit VR.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# VRs that may have an undefined length (sequences, encapsulated pixel data, unknown).
_UNDEFINED_OK = frozenset({b"SQ", b"OB", b"OW", b"UN"})
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
# Nesting deeper than this is not a real data set; refuse it rather than recurse without bound.
_MAX_DEPTH = 32


class MalformedDataSet(ValueError):
    """The bytes are not one complete DICOM data set in the negotiated transfer syntax."""


def read_header(data: bytes | memoryview, transfer_syntax: str) -> Dataset:
    """A Dataset holding the ``WANTED`` attributes present in ``data`` (undecoded until read).

    ``data`` is the data set as received, without File Meta Information. Raises
    MalformedDataSet when it is truncated or not DICOM.
    """
    if transfer_syntax == uid.DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as error:
            raise MalformedDataSet(f"deflated data set does not inflate: {error}") from None
    implicit = transfer_syntax == uid.ImplicitVRLittleEndian
    little = transfer_syntax != uid.ExplicitVRBigEndian
    walker = _Walker(memoryview(data), implicit=implicit, little=little)
    walker.walk(0, depth=0)
    dataset = Dataset()
    for element in walker.kept:
        dataset[element.tag] = element  # raw, decoded on access
    dataset.set_original_encoding(implicit, little)
    return dataset


class _Walker:
    def __init__(self, view: memoryview, *, implicit: bool, little: bool) -> None:
        self.view = view
        self.end = len(view)
        self.implicit = implicit
        self.little = little
        self.u16 = struct.Struct("<H" if little else ">H")
        self.u32 = struct.Struct("<L" if little else ">L")
        self.tag_struct = struct.Struct("<HH" if little else ">HH")
        self.kept: list[RawDataElement] = []

    def walk(self, pos: int, *, depth: int) -> int:
        """Walk one data set from ``pos``; nested ones end at their item delimiter."""
        if depth > _MAX_DEPTH:
            raise MalformedDataSet("sequences nested too deep")
        previous = -1
        while pos < self.end:
            tag, vr, length, value_pos = self._header(pos)
            if tag == _ITEM_END and depth > 0:
                return value_pos
            if tag <= previous:  # PS3.5 7.1: ascending order; random bytes rarely manage it
                raise MalformedDataSet(
                    f"elements out of order at ({tag >> 16:04X},{tag & 0xFFFF:04X})"
                )
            previous = tag
            if tag in (_ITEM, _ITEM_END, _SEQUENCE_END):
                raise MalformedDataSet(f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if length == _UNDEFINED:
                if vr is not None and vr not in _UNDEFINED_OK:
                    raise MalformedDataSet(f"undefined length on VR {vr!r}")
                pos = self._skip_items(value_pos, depth=depth)
                continue
            pos = value_pos + length
            if pos > self.end:
                raise MalformedDataSet(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of the data"
                )
            if depth == 0 and tag in WANTED:
                self.kept.append(
                    RawDataElement(
                        Tag(tag),
                        vr.decode() if vr is not None else None,
                        length,
                        bytes(self.view[value_pos:pos]),
                        value_pos,
                        self.implicit,
                        self.little,
                    )
                )
        if depth > 0:
            raise MalformedDataSet("data ends inside a sequence item")
        return pos

    def _skip_items(self, pos: int, *, depth: int) -> int:
        """Skip the items of an undefined-length sequence or encapsulated pixel data."""
        while True:
            tag, _, length, value_pos = self._header(pos)
            if tag == _SEQUENCE_END:
                return value_pos
            if tag != _ITEM:
                raise MalformedDataSet("sequence holds something that is not an item")
            if length == _UNDEFINED:
                pos = self.walk(value_pos, depth=depth + 1)
                continue
            pos = value_pos + length
            if pos > self.end:
                raise MalformedDataSet("an item runs past the end of the data")

    def _header(self, pos: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, length, where the value starts) of the element at ``pos``."""
        if pos + 8 > self.end:
            raise MalformedDataSet("data ends inside an element header")
        group, element = self.tag_struct.unpack_from(self.view, pos)
        tag = group << 16 | element
        if group == 0xFFFE or self.implicit:
            return tag, None, self.u32.unpack_from(self.view, pos + 4)[0], pos + 8
        vr = bytes(self.view[pos + 4 : pos + 6])
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise MalformedDataSet(f"no valid VR at ({group:04X},{element:04X})")
        if vr in _LONG_VRS:
            if pos + 12 > self.end:
                raise MalformedDataSet("data ends inside an element header")
            return tag, vr, self.u32.unpack_from(self.view, pos + 8)[0], pos + 12
        return tag, vr, self.u16.unpack_from(self.view, pos + 6)[0], pos + 8
