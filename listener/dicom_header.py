"""The few attributes the listener needs, read straight from the bytes a scanner sent.

Decoding a whole CT data set with pydicom costs more than storing it, and the listener needs only
the UIDs, a few series attributes and the certainty that the data set is whole. So this module
walks the element headers of the top-level data set (``common.dicom_elements.ElementWalker``)
and keeps the values of ``WANTED``. A data set that ends inside an element, or bytes that are not
DICOM at all, raise :class:`MalformedDataSet` before anything is written.

The kept values are decoded here too: pydicom's element conversion cost more per instance than
the walk, and plain ASCII (every UID, and nearly every modality, accession number and series
description) needs none of it. Only text with other bytes (or ISO 2022 escape sequences, which
are ASCII bytes) goes through pydicom, in the character set ``common.charsets`` resolves from the
data set's Specific Character Set, so a misspelt or missing one reads as the worker reads it.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from functools import cached_property

from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from hrct_triage.common.charsets import CharacterSet, decode_element, resolve
from hrct_triage.common.dicom_elements import ElementWalker, MalformedDataSet

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

# A refused deflated data set is inflated no further than this to name it: its identifying
# attributes lie near its start, and a small deflated body can inflate without bound.
_PARTIAL_INFLATE_BYTES = 4 * 1024 * 1024
# Kept values whose bytes are text in the Specific Character Set (PS3.5 6.1.2.3).
_TEXT = frozenset({ACCESSION_NUMBER, SERIES_DESCRIPTION})
_ESC = 0x1B


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
    return _kept(data, transfer_syntax, partial=False)


def read_partial_header(data: bytes | memoryview, transfer_syntax: str) -> Header:
    """The ``WANTED`` attributes found before ``data`` ends or breaks, never raising: for naming
    a refused instance (malformed, cut off, or over the size limit and so only partly kept) in
    its audit row. Its values are as untrusted as the rest of such a data set."""
    if transfer_syntax == uid.DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, _PARTIAL_INFLATE_BYTES)
        except zlib.error:
            return Header({}, implicit=False, little=True)
    return _kept(data, transfer_syntax, partial=True)


def _kept(data: bytes | memoryview, transfer_syntax: str, *, partial: bool) -> Header:
    implicit = transfer_syntax == uid.ImplicitVRLittleEndian
    little = transfer_syntax != uid.ExplicitVRBigEndian
    view = memoryview(data)
    found: list[tuple[int, bytes | None, int, int]] = []
    if partial:
        # what was walked before the break is all there is
        with contextlib.suppress(MalformedDataSet):
            ElementWalker(view).elements(0, implicit=implicit, little=little, into=found)
    else:
        found = ElementWalker(view).elements(0, implicit=implicit, little=little)[0]
    kept = {
        tag: RawDataElement(
            Tag(tag),
            vr.decode() if vr is not None else None,
            length,
            bytes(view[value_pos : value_pos + length]),
            value_pos,
            implicit,
            little,
        )
        for tag, vr, length, value_pos in found
        if tag in WANTED
    }
    return Header(kept, implicit, little)
