"""The few attributes the listener needs, read straight from the bytes a scanner sent.

Decoding a whole CT data set with pydicom costs more than storing it, and the listener needs only
the UIDs, a few series attributes and the certainty that the data set is whole. So this module
walks the element headers of the top-level data set, keeps the values of ``WANTED`` and skips
every other value by its length. Undefined-length sequences and encapsulated pixel data are
walked item by item only to find where they end. A data set that ends inside an element, or bytes
that are not DICOM at all, raise :class:`MalformedDataSet` before anything is written.

The kept values are decoded here too: pydicom's element conversion cost more per instance than
the walk, and plain ASCII (every UID, and nearly every modality, accession number and series
description) needs none of it. Only text with other bytes (or ISO 2022 escape sequences, which
are ASCII bytes) goes through pydicom, in the character set ``common.charsets`` resolves from the
data set's Specific Character Set, so a misspelt or missing one reads as the worker reads it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from functools import cached_property

from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from hrct_triage.common.charsets import CharacterSet, decode_element, resolve

SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
ACCESSION_NUMBER = 0x00080050
MODALITY = 0x00080060
SERIES_DESCRIPTION = 0x0008103E
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
SERIES_NUMBER = 0x00200011

# Top-level attributes the listener records (and the character set they are encoded in).
WANTED = frozenset(
    {
        SPECIFIC_CHARACTER_SET,
        SOP_CLASS_UID,
        SOP_INSTANCE_UID,
        ACCESSION_NUMBER,
        MODALITY,
        SERIES_DESCRIPTION,
        STUDY_INSTANCE_UID,
        SERIES_INSTANCE_UID,
        SERIES_NUMBER,
    }
)

# Kept values whose bytes are text in the Specific Character Set (PS3.5 6.1.2.3).
_TEXT = frozenset({ACCESSION_NUMBER, SERIES_DESCRIPTION})
_ESC = 0x1B

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


@dataclass(frozen=True)
class Header:
    """The ``WANTED`` attributes of a received data set, as their bytes, decoded on request."""

    elements: dict[int, RawDataElement]
    implicit: bool
    little: bool

    def uid(self, tag: int) -> str | None:
        """A UI value without its padding, unvalidated (``common.storage.validate_uid`` does it)."""
        element = self.elements.get(tag)
        if element is None or element.value is None:
            return None
        return element.value.decode("latin-1").rstrip("\0 ")

    def text(self, tag: int) -> str | None:
        """A CS/SH/LO/IS value without its padding; None when absent or empty. Values with bytes
        beyond ASCII or escape sequences are decoded by pydicom in the resolved character set;
        one that cannot be decoded counts as absent (not worth refusing the instance for)."""
        element = self.elements.get(tag)
        if element is None or not element.value:
            return None
        raw: bytes = element.value
        if raw.isascii() and _ESC not in raw:
            text = raw.decode("ascii").strip("\0 ")
        else:
            try:
                text = str(decode_element(element, self.character_set).value)
            except Exception:
                return None
        return text or None

    @cached_property
    def character_set(self) -> CharacterSet:
        """The character set the kept text values are read in (see ``common.charsets``)."""
        declared = self.elements.get(SPECIFIC_CHARACTER_SET)
        value = declared.value if declared is not None else None
        kept = (self.elements.get(tag) for tag in _TEXT)
        text = [element.value for element in kept if element is not None and element.value]
        return resolve(value.decode("latin-1").split("\\") if value else None, text)

    def integer(self, tag: int) -> int | None:
        """An IS value with one integer, else None."""
        text = self.text(tag)
        try:
            return int(text) if text is not None else None
        except ValueError:
            return None


def read_header(data: bytes | memoryview, transfer_syntax: str) -> Header:
    """The ``WANTED`` attributes present in ``data``.

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
    return Header({int(element.tag): element for element in walker.kept}, implicit, little)


class _Walker:
    def __init__(self, view: memoryview, *, implicit: bool, little: bool) -> None:
        self.view = view
        self.end = len(view)
        self.implicit = implicit
        self.little = little
        order = "<" if little else ">"
        self.u32 = struct.Struct(order + "L")
        # an element header whole in one unpack: tag and 4-byte length (implicit VR, items),
        # or tag, VR and 2-byte length (explicit VR)
        self.implicit_header = struct.Struct(order + "HHL")
        self.explicit_header = struct.Struct(order + "HH2sH")
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
        if self.implicit:
            group, element, length = self.implicit_header.unpack_from(self.view, pos)
            return group << 16 | element, None, length, pos + 8
        group, element, vr, short_length = self.explicit_header.unpack_from(self.view, pos)
        tag = group << 16 | element
        if group == 0xFFFE:  # item and delimiters: a 4-byte length where the VR would be
            return tag, None, self.u32.unpack_from(self.view, pos + 4)[0], pos + 8
        if not (vr.isalpha() and vr.isupper()):  # two ASCII capitals
            raise MalformedDataSet(f"no valid VR at ({group:04X},{element:04X})")
        if vr in _LONG_VRS:
            if pos + 12 > self.end:
                raise MalformedDataSet("data ends inside an element header")
            return tag, vr, self.u32.unpack_from(self.view, pos + 8)[0], pos + 12
        return tag, vr, short_length, pos + 8
