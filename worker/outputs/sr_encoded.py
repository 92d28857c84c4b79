"""Content sequences of the SR handed to pydicom already encoded, as pydicom would encode them.

Writing the SR of a 300-slice study was half of building and writing all outputs: pydicom's
writer spends ~40 us per element and the image library and the measurement group's source
images are ~4,500 items of near-identical shape. pydicom writes a raw data element's bytes as
they are (and ``Dataset.set_original_encoding`` exists for this), so those two content sequences
are encoded here once, in the SR's encoding (Explicit VR Little Endian), and stored as one raw
element each. The per-image items are filled into fixed element layouts; every other item (codes,
highdicom's content items) is encoded by pydicom's own writer.

The bytes are the ones pydicom writes for the same items built as datasets (defined lengths,
elements in tag order, the same padding); tests/test_sr_encoded.py compares whole SRs both ways.
Text must be ASCII: it then reads the same in every character set an SR may declare. Where it is
not, :func:`content_sequence` returns None and the caller keeps plain datasets.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import cast

from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence_item
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DS, VR

from hrct_triage.common.dicom_elements import explicit_element, uid_value

__all__ = [
    "PreEncoded",
    "content_sequence",
    "encoded_code",
    "encoded_image_item",
    "is_pre_encoded",
]

_CONTENT_SEQUENCE = Tag(0x0040, 0xA730)


class PreEncoded(RawDataElement):
    """A sequence element whose value is its items in Explicit VR Little Endian, ASCII text only.

    A subclass so that ``worker.outputs.write_prep`` can tell it from raw elements read from a
    source file, whose text may need re-encoding in the output's character set.
    """

    __slots__ = ()


def is_pre_encoded(element: object) -> bool:
    """True for elements made here (safe to write as they are, in explicit VR little endian)."""
    return isinstance(element, PreEncoded)


def content_sequence(children: Iterable[Dataset | bytes]) -> PreEncoded | None:
    """A ContentSequence of ``children``: datasets (encoded by pydicom) or items from here.

    None when a dataset holds text beyond ASCII or an element other than text, numbers and
    sequences, or an item from here would (a UID that is not ASCII): then only pydicom, at write
    time and in the SR's character set, can encode it. ``children`` is consumed in order, so
    items made lazily after the datasets are made only if those are plain.
    """
    parts: list[bytes] = []
    try:
        for child in children:
            if isinstance(child, bytes):
                parts.append(child)
                continue
            if not _plain_ascii(child):
                return None
            buffer = DicomBytesIO()
            buffer.is_little_endian, buffer.is_implicit_VR = True, False
            write_sequence_item(buffer, child, ["iso8859"])
            parts.append(buffer.getvalue())
    except UnicodeEncodeError:
        return None
    body = b"".join(parts)
    return PreEncoded(BaseTag(_CONTENT_SEQUENCE), "SQ", len(body), body, 0, False, True)


def encoded_code(code: Dataset) -> bytes:
    """A code item (CodeValue, CodingSchemeDesignator, ...) as one item of a code sequence."""
    if not _plain_ascii(code):
        raise ValueError(f"code: {code.get('CodeMeaning')!r} is not plain ASCII text")
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_sequence_item(buffer, code, ["iso8859"])
    return buffer.getvalue()


def encoded_image_item(
    relationship: str,
    name: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    positions: Iterable[tuple[bytes, bytes, float]] = (),
) -> bytes:
    """An IMAGE content item referencing one single-frame image, optionally with NUM children.

    ``name`` is the concept name as :func:`encoded_code` gives it; each of ``positions`` is
    (concept name item, unit item, value), written as a NUM item HAS ACQ CONTEXT with the value
    as DS (pydicom's ``auto_format``) and FD, as highdicom's ``NumContentItem`` holds it.
    """
    reference = _item(
        explicit_element(0x00081150, b"UI", uid_value(sop_class_uid))
        + explicit_element(0x00081155, b"UI", uid_value(sop_instance_uid))
    )
    body = (
        explicit_element(0x00081199, b"SQ", reference)
        + explicit_element(0x0040A010, b"CS", _text(relationship))
        + explicit_element(0x0040A040, b"CS", b"IMAGE ")
        + explicit_element(0x0040A043, b"SQ", name)
    )
    children = b"".join(_num_item(concept, unit, value) for concept, unit, value in positions)
    if children:
        body += explicit_element(0x0040A730, b"SQ", children)
    return _item(body)


def _num_item(name: bytes, unit: bytes, value: float) -> bytes:
    measured = _item(
        explicit_element(0x004008EA, b"SQ", unit)
        + explicit_element(0x0040A161, b"FD", struct.pack("<d", value))
        + explicit_element(0x0040A30A, b"DS", _text(str(DS(value, auto_format=True))))
    )
    return _item(
        explicit_element(0x0040A010, b"CS", b"HAS ACQ CONTEXT ")
        + explicit_element(0x0040A040, b"CS", b"NUM ")
        + explicit_element(0x0040A043, b"SQ", name)
        + explicit_element(0x0040A300, b"SQ", measured)
    )


_ITEM_HEADER = struct.Struct("<HHL")


def _item(body: bytes) -> bytes:
    """A sequence item of defined length (pydicom's in-memory items are written that way)."""
    return _ITEM_HEADER.pack(0xFFFE, 0xE000, len(body)) + body


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


_TEXT_VRS = frozenset({VR.AE, VR.CS, VR.DA, VR.DS, VR.DT, VR.IS, VR.LO, VR.LT, VR.PN, VR.SH})
_TEXT_VRS |= frozenset({VR.ST, VR.TM, VR.UC, VR.UI, VR.UR, VR.UT})
_NUMBER_VRS = frozenset({VR.FD, VR.FL, VR.SL, VR.SS, VR.UL, VR.US})


def _plain_ascii(item: Dataset) -> bool:
    """Only ASCII text, numbers and nested items, none raw or pre-encoded, in ``item``'s tree."""
    stack = [item]
    while stack:
        current = stack.pop()
        if "SpecificCharacterSet" in current:
            return False
        for element in current.elements():
            if not isinstance(element, DataElement):
                return False
            if element.VR == VR.SQ:
                stack.extend(cast(Iterable[Dataset], element.value))
            elif element.VR in _TEXT_VRS:
                values = element.value if element.VM > 1 else [element.value]
                if not all(str("" if v is None else v).isascii() for v in values):
                    return False
            elif element.VR not in _NUMBER_VRS:
                return False
    return True
