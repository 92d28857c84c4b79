"""Specific Character Set (0008,0005) as scanners send it, turned into what pydicom decodes.

PS3.3 C.12.1.1.2 defines the terms. Scanners also send terms it does not define (``ISO_IR 149``,
``ISO-8859-1``, lower case), terms nobody defines, none at all above text with bytes beyond
ASCII, or a term their text is not encoded in. :func:`resolve` turns any of these into Defined
Terms and says in one sentence what it substituted and why, so that no study fails on its text
and the substitution can be put on record. Nothing here raises on what a scanner sent.

Only the text value representations (SH, LO, UC, ST, LT, UT, PN; PS3.5 6.1.2.3) are affected.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import charset as pydicom_charset
from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName

__all__ = [
    "DEFINED_TERMS",
    "CharacterSet",
    "decode_element",
    "decoded",
    "of_dataset",
    "resolve",
    "substitutions",
]

SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)

#: PS3.3 Table C.12-2: single-byte character sets without code extensions.
SINGLE_BYTE = (
    "ISO_IR 100",
    "ISO_IR 101",
    "ISO_IR 109",
    "ISO_IR 110",
    "ISO_IR 144",
    "ISO_IR 127",
    "ISO_IR 126",
    "ISO_IR 138",
    "ISO_IR 148",
    "ISO_IR 203",
    "ISO_IR 13",
    "ISO_IR 166",
)
#: PS3.3 Table C.12-3: single-byte character sets with code extensions.
SINGLE_BYTE_EXTENSIONS = (
    "ISO 2022 IR 6",
    *(term.replace("_IR", " 2022 IR") for term in SINGLE_BYTE),
)
#: PS3.3 Table C.12-4: multi-byte character sets with code extensions.
MULTI_BYTE_EXTENSIONS = ("ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58")
#: PS3.3 Table C.12-5: multi-byte character sets without code extensions (each stands alone).
STAND_ALONE = ("ISO_IR 192", "GB18030", "GBK")
#: Every Defined Term; the empty term is the default repertoire (ASCII).
DEFINED_TERMS = frozenset(
    {"", *SINGLE_BYTE, *SINGLE_BYTE_EXTENSIONS, *MULTI_BYTE_EXTENSIONS, *STAND_ALONE}
)

_TEXT_VRS = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "PN"})
_ESC = b"\x1b"
# ISO 8859 part -> the Defined Term of that repertoire (ISO 8859-11 is TIS 620 plus a space).
_ISO_8859_PARTS = {
    1: "ISO_IR 100",
    2: "ISO_IR 101",
    3: "ISO_IR 109",
    4: "ISO_IR 110",
    5: "ISO_IR 144",
    6: "ISO_IR 127",
    7: "ISO_IR 126",
    8: "ISO_IR 138",
    9: "ISO_IR 148",
    11: "ISO_IR 166",
    15: "ISO_IR 203",
}
# Names of the same repertoires outside DICOM, with case, spaces, "-" and "_" removed.
_ALIASES = {
    "UTF8": "ISO_IR 192",
    "UNICODE": "ISO_IR 192",
    "LATIN1": "ISO_IR 100",
    "LATIN2": "ISO_IR 101",
    "LATIN9": "ISO_IR 203",
    "GB18030": "GB18030",
    "GBK": "GBK",
    "GB2312": "ISO 2022 IR 58",
    "EUCKR": "ISO 2022 IR 149",
    "KSC5601": "ISO 2022 IR 149",
    "ISO2022JP": "ISO 2022 IR 87",
    "SHIFTJIS": "ISO_IR 13",
    "SJIS": "ISO_IR 13",
    "TIS620": "ISO_IR 166",
}
# What a data set with escape sequences but no usable declaration is read with: every code
# extension, since each escape sequence names its own set.
_EVERY_EXTENSION = ("", *SINGLE_BYTE_EXTENSIONS[1:], *MULTI_BYTE_EXTENSIONS)


def _complete_pydicom_tables() -> None:
    """Let pydicom read and write the two Defined Terms its 3.0 tables get wrong.

    - Latin alphabet No. 9: pydicom maps every Defined Term to a Python codec except
      ``ISO_IR 203`` and ``ISO 2022 IR 203``, which it reads as ASCII with a warning. Added as
      PS3.3 Tables C.12-2 and C.12-3 give them (ISO 8859-15, escape sequence ESC 02/13 06/02);
      ``setdefault``, so a pydicom that knows them keeps its own entries.
    - ISO 2022 IR 58 (GB 2312): pydicom counts it among the codecs that consume their own
      escape sequences, but Python's GB 2312 codec knows none, so ``ESC $ ) A`` stayed in the
      decoded text and was never written. Taken off that list only while that is so (checked
      on PS3.5 Example K.2-1's first character), so pydicom strips and writes the sequence as
      it does for Korean.

    pydicom reads these module-level tables on each call; changing them is how it is extended.
    """
    latin9 = "iso8859_15"
    pydicom_charset.python_encoding.setdefault("ISO_IR 203", latin9)
    pydicom_charset.python_encoding.setdefault("ISO 2022 IR 203", latin9)
    pydicom_charset.CODES_TO_ENCODINGS.setdefault(_ESC + b"-b", latin9)
    pydicom_charset.ENCODINGS_TO_CODES.setdefault(latin9, _ESC + b"-b")
    gb2312 = "iso_ir_58"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zhang = pydicom_charset.decode_bytes(b"\x1b$)A\xd5\xc5", ["iso8859", gb2312], set())
    if zhang != "张" and gb2312 in pydicom_charset.handled_encodings:
        kept = tuple(name for name in pydicom_charset.handled_encodings if name != gb2312)
        pydicom_charset.handled_encodings = kept  # type: ignore[assignment]  # typed as 3 names


_complete_pydicom_tables()


@dataclass(frozen=True)
class CharacterSet:
    """How to read a data set's text: Defined Terms, and what was substituted and why.

    ``terms`` is a value for Specific Character Set (its first term may be empty: the default
    repertoire with code extensions); ``substitution`` is None when the terms are what the data
    set declared.
    """

    terms: tuple[str, ...]
    substitution: str | None = None

    @property
    def value(self) -> str | list[str]:
        """``terms`` as pydicom stores a Specific Character Set value."""
        return self.terms[0] if len(self.terms) == 1 else list(self.terms)

    @property
    def encodings(self) -> list[str]:
        """The Python codecs pydicom decodes ``terms`` with."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Defined Terms only: nothing to warn about
            return pydicom_charset.convert_encodings(list(self.terms))


def resolve(declared: str | Sequence[str] | None, text: Iterable[bytes] = ()) -> CharacterSet:
    """The Defined Terms to read ``text`` with, given the Specific Character Set ``declared``.

    ``text`` is the raw bytes of the data set's text values (see :func:`of_dataset`); it is
    looked at only when the declaration is missing, unknown or does not fit the bytes.
    """
    values = _values(declared)
    chunks = [chunk for chunk in text if chunk]
    if not any(values):
        return _guess(None, chunks)
    canonical = [_canonical(value) for value in values]
    if len(values) == 1:
        (term,) = canonical
        if term is None:
            return _guess(values[0], chunks)
        substitution = None
        if term != values[0]:
            substitution = f"Specific Character Set {values[0][:64]!r} is not a Defined Term"
            substitution += f"; read as {term!r}"
        misfit = _misfit(term, chunks)
        if misfit is not None:
            return _guess(values[0], chunks, misfit=misfit)
        return CharacterSet((term,), substitution)
    return _with_extensions(values, canonical)


def of_dataset(ds: Dataset) -> CharacterSet:
    """The character set of ``ds``'s top-level text, from its raw values where still raw."""
    return resolve(_declared(ds), _text_bytes(ds))


def substitutions(datasets: Iterable[Dataset]) -> list[str]:
    """The distinct substitutions :func:`of_dataset` makes for ``datasets``, in order.

    The sentences name character sets only, never text, so they may go to logs and the worklist.
    """
    found = dict.fromkeys(of_dataset(ds).substitution for ds in datasets)
    return [note for note in found if note]


def decode_element(element: RawDataElement, character_set: CharacterSet) -> DataElement:
    """``element`` converted by pydicom, its text read in ``character_set``."""
    return convert_raw_data_element(element, encoding=character_set.encodings)


def decoded(ds: Dataset) -> Dataset:
    """A copy of ``ds`` whose text reads in its resolved character set (:func:`of_dataset`).

    The copy has its own elements (``Dataset.copy`` shares them) and declares the resolved
    terms; values still raw are decoded by pydicom on first access, sequence items included.
    Values pydicom left on disk (pixel data) are not copied: they are never text.
    """
    character_set = of_dataset(ds)
    encodings = character_set.encodings
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset would decode every element
        element = ds.get_item(tag)
        raw = _raw_value(element)
        if isinstance(element, RawDataElement) and raw is None and element.length:
            continue  # left on disk
        if raw and _vr(element) == "PN":
            element = DataElement(tag, "PN", _person_names(raw, encodings))
        elements[tag] = element
    copy = Dataset(elements)
    implicit, little = ds.original_encoding
    copy.set_original_encoding(implicit, little, encodings)
    copy[SPECIFIC_CHARACTER_SET] = DataElement(SPECIFIC_CHARACTER_SET, "CS", character_set.value)
    return copy


def _person_names(raw: bytes, encodings: list[str]) -> PersonName | list[PersonName]:
    """A PN value decoded as a whole, as PS3.5 6.1.2.5.3 reads it.

    pydicom's own PN conversion encodes the decoded name again to keep its bytes, and its
    encoder cannot write everything its decoder reads (a single ``ISO 2022 IR 87``, JIS X 0201
    katakana beside Roman letters), which replaced such names with "?". Decoded here, the name
    holds text only and is encoded once, in the output's character set.
    """
    delimiters = {0x5E, 0x3D, *TEXT_VR_DELIMS}  # "^", "=" and control characters reset G1
    names = [
        PersonName(text)
        for text in decode_bytes(raw.rstrip(b"\0 "), encodings, delimiters).split("\\")
    ]
    return names[0] if len(names) == 1 else names


def _raw_value(element: DataElement | RawDataElement) -> bytes | None:
    """The bytes of a text value as read: raw, or kept by pydicom for a decoded PN."""
    if isinstance(element, RawDataElement):
        return element.value
    value = element.value
    return value.original_string if isinstance(value, PersonName) else None


def _vr(element: DataElement | RawDataElement) -> str | None:
    """The VR of ``element``; from the dictionary when read in implicit VR (None if private)."""
    if element.VR is not None:
        return str(element.VR)
    try:
        return str(dictionary_VR(element.tag))
    except KeyError:
        return None


def _values(declared: str | Sequence[str] | None) -> list[str]:
    if declared is None:
        return []
    if isinstance(declared, str):
        declared = declared.split("\\")
    return [str(value).strip(" \0") for value in declared]


def _canonical(value: str) -> str | None:
    """The Defined Term ``value`` means, or None when it names no repertoire of DICOM."""
    if value in DEFINED_TERMS:
        return value
    key = re.sub(r"[\s_\-]", "", value.upper())
    if match := re.fullmatch(r"ISO2022IR(\d+)", key):
        return _term_numbered(int(match.group(1)), prefer_extensions=True)
    if match := re.fullmatch(r"ISOIR(\d+)", key):
        return _term_numbered(int(match.group(1)), prefer_extensions=False)
    if match := re.fullmatch(r"(?:ISO)?8859(\d+)", key):
        return _ISO_8859_PARTS.get(int(match.group(1)))
    return _ALIASES.get(key)


def _term_numbered(number: int, *, prefer_extensions: bool) -> str | None:
    """The Defined Term of ISO-IR registration ``number``, in the form asked for if it exists."""
    if number == 6:
        return ""  # ISO-IR 6 is ASCII, the default repertoire
    plain, extended = f"ISO_IR {number}", f"ISO 2022 IR {number}"
    order = (extended, plain) if prefer_extensions else (plain, extended)
    return next((term for term in order if term in DEFINED_TERMS), None)


def _with_extensions(values: list[str], canonical: list[str | None]) -> CharacterSet:
    """A multi-valued declaration: the first term, then the code extensions that are usable."""
    notes: list[str] = []
    first = "" if not values[0] else canonical[0]
    if first is None:
        notes.append(f"{values[0]!r} is not a DICOM character set, read as ASCII")
        first = ""
    elif first != values[0]:
        notes.append(_renamed(values[0], first))
    if first in STAND_ALONE:
        notes.append(f"{first!r} allows no code extensions; the others were ignored")
        return CharacterSet((first,), _note(values, notes))
    terms = [first]
    for value, term in zip(values[1:], canonical[1:], strict=True):
        if term is None:
            notes.append(f"{value!r} is not a DICOM character set, ignored")
        elif term in STAND_ALONE:
            notes.append(f"{term!r} cannot be a code extension, ignored")
        elif term and term not in terms:
            if term != value:
                notes.append(_renamed(value, term))
            terms.append(term)
    return CharacterSet(tuple(terms), _note(values, notes) if notes else None)


def _renamed(value: str, term: str) -> str:
    return f"{value!r} is not a Defined Term, read as {term!r}"


def _note(values: list[str], notes: list[str]) -> str:
    declared = "\\".join(values)[:64]
    return f"Specific Character Set {declared!r}: " + "; ".join(notes)


def _misfit(term: str, chunks: list[bytes]) -> str | None:
    """Why ``chunks`` cannot be text in ``term`` (a set without code extensions), or None.

    Only sets that do not switch with escape sequences can be checked this simply; single-byte
    sets other than Japanese and Thai decode every byte, so in practice this catches UTF-8,
    GB18030 and GBK declared above bytes of another set.
    """
    if term not in STAND_ALONE or any(_ESC in chunk for chunk in chunks):
        return None
    codec = CharacterSet((term,)).encodings[0]
    for chunk in chunks:
        try:
            chunk.decode(codec)
        except UnicodeDecodeError:
            return f"the text is not valid {term}"
    return None


def _guess(declared: str | None, chunks: list[bytes], misfit: str | None = None) -> CharacterSet:
    """No usable declaration: read the bytes in the set they most plausibly are."""
    if declared is None:
        problem = "Specific Character Set is missing but the text has bytes beyond ASCII"
    elif misfit is not None:
        problem = f"Specific Character Set {declared[:64]!r}: {misfit}"
    else:
        problem = f"Specific Character Set {declared[:64]!r} is not a DICOM character set"
    if any(_ESC in chunk for chunk in chunks):
        return CharacterSet(
            _EVERY_EXTENSION,
            f"{problem}; the text holds escape sequences, read with every ISO 2022 code extension",
        )
    if all(chunk.isascii() for chunk in chunks):
        if declared is None:
            return CharacterSet(("",))  # ASCII with no declaration: exactly the standard
        return CharacterSet(("",), f"{problem}; the text is ASCII, read as such")
    if all(_is_utf8(chunk) for chunk in chunks):
        return CharacterSet(("ISO_IR 192",), f"{problem}; read as 'ISO_IR 192' (valid UTF-8)")
    return CharacterSet(("ISO_IR 100",), f"{problem}; read as 'ISO_IR 100' (Latin-1)")


def _is_utf8(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _declared(ds: Dataset) -> str | list[str] | None:
    """The Specific Character Set of ``ds`` as sent, read without pydicom's corrections."""
    if SPECIFIC_CHARACTER_SET not in ds:
        return None
    element = ds.get_item(SPECIFIC_CHARACTER_SET)
    if isinstance(element, RawDataElement):
        raw = element.value or b""
        return raw.decode("latin-1").split("\\")
    value: Any = element.value
    if value is None:
        return None
    return value if isinstance(value, str) else [str(v) for v in value]


def _text_bytes(ds: Dataset) -> list[bytes]:
    """The raw bytes of ``ds``'s top-level text values (those decoded already are skipped)."""
    found: list[bytes] = []
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset would decode every element
        element = ds.get_item(tag)
        raw = _raw_value(element)
        if raw and _vr(element) in _TEXT_VRS:
            found.append(raw)
    return found
