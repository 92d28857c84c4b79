"""DICOM data elements read and written straight as bytes, where pydicom's per-element cost counts.

Reading: :class:`ElementWalker` walks the element headers of a data set with ``struct`` and lists
where each top-level value lies, skipping every value by its length. The listener reads the few
attributes it records from each received instance this way, and the worker reads the headers
of every file of a study; pydicom spends a generator step, a ``tell`` and two ``read`` calls on
each element. Undefined-length sequences and encapsulated pixel data are walked item by item only
to find where they end. Bytes that are not one complete data set raise
:class:`MalformedDataSet`.

Writing: :func:`explicit_element` and :func:`uid_value` encode an element in Explicit VR Little
Endian and a UI value exactly as pydicom's writer does, for the few places that build bytes by
hand (the spool's File Meta, the SR's pre-encoded content items).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Generic, TypeVar

from hrct_triage.common.errors import DicomInputError

__all__ = [
    "LONG_VRS",
    "UNDEFINED_LENGTH",
    "Element",
    "ElementWalker",
    "MalformedDataSet",
    "explicit_element",
    "uid_value",
]

# PS3.5 7.1.2: these VRs have a 2-byte reserved field and a 4-byte length in explicit VR.
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
UNDEFINED_LENGTH = 0xFFFFFFFF
# VRs that may have an undefined length (sequences, encapsulated pixel data, unknown).
_UNDEFINED_OK = frozenset({b"SQ", b"OB", b"OW", b"UN"})
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_DELIMITERS = (_ITEM, _ITEM_END, _SEQUENCE_END)
# A VR in explicit VR is two ASCII capitals; anything else means the bytes are not DICOM.
_VR_CODES = frozenset(bytes((a, b)) for a in range(0x41, 0x5B) for b in range(0x41, 0x5B))
# Nesting deeper than this is not a real data set; refuse it rather than recurse without bound.
_MAX_DEPTH = 32
# An element header whole in one unpack: tag and 4-byte length (implicit VR, items), or tag, VR
# and 2-byte length (explicit VR); by byte order.
_IMPLICIT = {True: struct.Struct("<HHL"), False: struct.Struct(">HHL")}
_EXPLICIT = {True: struct.Struct("<HH2sH"), False: struct.Struct(">HH2sH")}
_U32 = {True: struct.Struct("<L"), False: struct.Struct(">L")}
_LE_SHORT = struct.Struct("<HH2sH")
_LE_LONG = struct.Struct("<HH2sHL")

Buffer = TypeVar("Buffer", bytes, memoryview)

#: A top-level element: tag, VR (None in implicit VR), value length, offset of the value.
Element = tuple[int, bytes | None, int, int]


class MalformedDataSet(DicomInputError):
    """The bytes are not one complete DICOM data set in the transfer syntax they are read in."""


class ElementWalker(Generic[Buffer]):
    """The element headers of a data set of ``size`` bytes, of which ``data`` is held.

    ``data`` holds the bytes from offset 0; where it holds only the start (a file read in
    part), ``read_at(offset, count)`` gives the bytes from ``offset`` (``count`` of them at
    least, unless the end comes first) and :attr:`data` / :attr:`start` follow the window read
    last. Offsets are always from the start of the whole.
    """

    def __init__(
        self,
        data: Buffer,
        *,
        size: int | None = None,
        read_at: Callable[[int, int], Buffer] | None = None,
    ) -> None:
        if (size is None) != (read_at is None):
            raise ValueError("size and read_at: give both (data holds the start) or neither")
        self.data: Buffer = data
        self.start = 0
        self.size = len(data) if size is None else size
        self._read_at: Callable[[int, int], Buffer] | None = read_at

    def elements(
        self,
        pos: int,
        *,
        implicit: bool,
        little: bool = True,
        group: int | None = None,
        undefined: bool = True,
        into: list[Element] | None = None,
    ) -> tuple[list[Element], int]:
        """The top-level elements from ``pos`` to the end, and where the walk stopped.

        ``into`` receives the elements as they are walked, so a caller that names a broken data
        set keeps those found before the break.

        With ``group``, the walk stops before the first element of another group (the File
        Meta). Elements of undefined length are walked over and not listed; with
        ``undefined=False`` one raises MalformedDataSet instead. Raises MalformedDataSet where
        an element runs past the end, elements are out of order, a VR is no VR, or an item
        delimiter stands outside a sequence.
        """
        return self._walk(pos, implicit, little, group, undefined, 0, into)

    def window(self, pos: int, count: int) -> tuple[Buffer, int]:
        """The held bytes and their offset, read again from ``pos`` where they do not hold
        ``count`` bytes from there (a file read in part)."""
        if self._read_at is not None and (
            pos < self.start or pos + count > self.start + len(self.data)
        ):
            self.start = pos
            self.data = self._read_at(pos, count)
        return self.data, self.start

    def _walk(
        self,
        pos: int,
        implicit: bool,
        little: bool,
        group: int | None,
        undefined: bool,
        depth: int,
        into: list[Element] | None = None,
    ) -> tuple[list[Element], int]:
        """One data set from ``pos``; a nested one (``depth`` > 0) ends at its item delimiter."""
        if depth > _MAX_DEPTH:
            raise MalformedDataSet("sequences nested too deep")
        header = _IMPLICIT[little] if implicit else _EXPLICIT[little]
        u32 = _U32[little]
        vr_codes, long_vrs, undefined_length = _VR_CODES, LONG_VRS, UNDEFINED_LENGTH
        found: list[Element] = [] if into is None else into
        append = found.append
        previous = -1
        size = self.size
        data, start = self.data, self.start
        held = start + len(data) - 12  # the last offset whose 12 header bytes are held
        vr: bytes | None
        while pos < size:
            if pos > held or pos < start:
                if pos + 8 > size:
                    raise MalformedDataSet("data ends inside an element header")
                data, start = self.window(pos, 12)
                held = start + len(data) - 12
            at = pos - start
            if implicit:
                number, element, length = header.unpack_from(data, at)
                vr = None
            else:
                number, element, vr, length = header.unpack_from(data, at)
            if group is not None and number != group:
                return found, pos
            value_pos = pos + 8
            tag = number << 16 | element
            if number == 0xFFFE:  # items and delimiters: a 4-byte length, no VR
                if tag == _ITEM_END and depth > 0:
                    return found, value_pos
                if tag in _DELIMITERS:
                    raise MalformedDataSet(f"unexpected delimiter ({number:04X},{element:04X})")
                if vr is not None:
                    vr = None
                    length = u32.unpack_from(data, at + 4)[0]
            elif vr is not None:
                if vr not in vr_codes:
                    raise MalformedDataSet(f"no valid VR at ({number:04X},{element:04X})")
                if vr in long_vrs:
                    if pos + 12 > size:
                        raise MalformedDataSet("data ends inside an element header")
                    length = u32.unpack_from(data, at + 8)[0]
                    value_pos += 4
            if tag <= previous:  # PS3.5 7.1: ascending order; random bytes rarely manage it
                raise MalformedDataSet(f"elements out of order at ({number:04X},{element:04X})")
            previous = tag
            if length == undefined_length:
                if not undefined:
                    raise MalformedDataSet(f"undefined length at ({number:04X},{element:04X})")
                if vr is not None and vr not in _UNDEFINED_OK:
                    raise MalformedDataSet(f"undefined length on VR {vr!r}")
                pos = self._skip_items(value_pos, implicit, little, depth)
                data, start = self.data, self.start
                held = start + len(data) - 12
                continue
            pos = value_pos + length
            if pos > size:
                raise MalformedDataSet(
                    f"element ({number:04X},{element:04X}) runs past the end of the data"
                )
            append((tag, vr, length, value_pos))
        if depth > 0:
            raise MalformedDataSet("data ends inside a sequence item")
        return found, pos

    def _skip_items(self, pos: int, implicit: bool, little: bool, depth: int) -> int:
        """Skip the items of an undefined-length sequence or encapsulated pixel data."""
        item_header = _IMPLICIT[little]
        size = self.size
        while True:
            if pos + 8 > size:
                raise MalformedDataSet("data ends inside an element header")
            data, start = self.window(pos, 8)
            number, element, length = item_header.unpack_from(data, pos - start)
            tag = number << 16 | element
            value_pos = pos + 8
            if tag == _SEQUENCE_END:
                return value_pos
            if tag != _ITEM:
                raise MalformedDataSet("sequence holds something that is not an item")
            if length == UNDEFINED_LENGTH:
                pos = self._walk(value_pos, implicit, little, None, True, depth + 1)[1]
                continue
            pos = value_pos + length
            if pos > size:
                raise MalformedDataSet("an item runs past the end of the data")


def uid_value(uid: str, *, errors: str = "strict") -> bytes:
    """A UI value as written: ASCII (``errors`` as ``str.encode`` takes it), NUL-padded to an
    even length."""
    raw = uid.encode("ascii", errors)
    return raw + b"\0" if len(raw) % 2 else raw


def explicit_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a defined length, as pydicom writes it;
    ``value`` is already padded to an even length."""
    if vr in LONG_VRS:
        return _LE_LONG.pack(tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return _LE_SHORT.pack(tag >> 16, tag & 0xFFFF, vr, len(value)) + value
